"""How fast and how lean the CPU selective scan runs, forward and backward, as L grows.

Ours: `selective_scan(..., backend="sequential")`, the CPU fast path (mgi.models.mamba.
_SequentialScan: a loop over the sequence in chunks with a hand-written backward that recomputes
each chunk's states from the state saved at its start). Baseline: the "reference" backend, the
recurrence stepped under autograd as mamba_ssm's `selective_scan_ref` does (per-step slices by
`unbind`, so its backward stays linear in L): what a CPU user without a custom kernel runs, and
the numbers every backend is tested against, so the fair one to beat. Both get the same inputs,
laid out and scaled as a Mamba block makes them (d_inner 256, d_state 16, batch 1; u, delta, z,
B, C as (b, c, L) views of sequence-major tensors, S4D-real A, D, delta_bias, softplus).

Outputs and all eight gradients are checked to agree at every L before timing. Runs alternate,
repeat, and keep the median; peak memory (VmHWM above the inputs, see _memory.py) is read from a
fresh worker process per contender and L. limit_s: three passes of one in-place multiply-add per
step over the (d_state, d_inner) state (forward, its recomputation, the reverse recurrence), the
floor for a stepwise scan driven from Python. One JSON line per L, then the summary line (ratio
at the longest L; t16k_over_t1k: our time growth for 16x the length, 16 = linear).
`--quick`: L = 128, 512, 2,048. `--device cuda` (where a GPU is at hand): ours is mamba_ssm's
kernel where importable, else the "chunked" backend, against the same reference on the GPU;
peak memory is then torch.cuda.max_memory_allocated of each pass.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch
from _memory import peak_rss_mb, print_result, run_worker, worker_arguments

from mgi.models.mamba import selective_scan

D_INNER, D_STATE, BATCH = 256, 16, 1
ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(length: int, *, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Scan inputs as a Mamba block hands them over (mamba_ssm shapes), all requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def sequence_major(channels: int, scale: float = 1.0) -> torch.Tensor:
        """(b, channels, L) view of a (b, L, channels) tensor, as the block's projections make."""
        return (torch.randn(BATCH, length, channels, generator=g) * scale).transpose(1, 2)

    dt = torch.exp(torch.rand(D_INNER, generator=g) * math.log(100) + math.log(1e-3))
    tensors = {
        "u": sequence_major(D_INNER),
        "delta": sequence_major(D_INNER, 0.1),  # dt_proj output, before its bias
        "A": -torch.arange(1.0, D_STATE + 1).repeat(D_INNER, 1),  # S4D-real initialisation
        "B": sequence_major(D_STATE),
        "C": sequence_major(D_STATE),
        "D": torch.ones(D_INNER),
        "z": sequence_major(D_INNER),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus(bias) in [1e-3, 1e-1]
    }
    return {k: v.to(device).requires_grad_() for k, v in tensors.items()}


def forward_backward(inputs: dict[str, torch.Tensor], backend: str, grad_out: torch.Tensor):
    """Seconds of one forward and backward pass, the output and the inputs' gradients."""
    for t in inputs.values():
        t.grad = None
    cuda = grad_out.is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    y.backward(grad_out)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, y.detach(), {k: v.grad for k, v in inputs.items()}


def max_relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference|."""
    return float((ours - reference).abs().max() / reference.abs().max())


def loop_floor(length: int) -> float:
    """Seconds of 3 * length in-place addcmul steps on a (b, d_state, d_inner) state."""
    h, a, b = (torch.rand(BATCH, D_STATE, D_INNER) for _ in range(3))
    start = time.perf_counter()
    for _ in range(3 * length):
        b.addcmul_(a, h)
    return time.perf_counter() - start


def worker(backend: str, length: int, *, threads: int) -> None:
    """One forward + backward in a fresh process; print its peak memory above the inputs (MB)."""
    torch.set_num_threads(threads)
    warm = make_inputs(64)
    forward_backward(warm, backend, torch.ones(BATCH, D_INNER, 64))  # thread pools, allocator
    inputs = make_inputs(length)
    grad_out = torch.randn(BATCH, D_INNER, length, generator=torch.Generator().manual_seed(1))
    before = peak_rss_mb()
    seconds = forward_backward(inputs, backend, grad_out)[0]
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb() - before}))


def peak_memory(backend: str, length: int, *, threads: int) -> float:
    """Peak MB above the inputs of one forward + backward in a fresh process."""
    return run_worker(__file__, backend, str(length), "--threads", str(threads))["peak_mb"]


def short(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def main(argv: list[str] | None = None) -> dict:
    args = worker_arguments(
        __doc__, quick="L = 128, 512, 2,048", worker=("BACKEND", "L"), argv=argv, device=True
    )
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), threads=args.threads)
        return {}
    torch.set_num_threads(args.threads)
    device = args.device
    ours = "sequential"
    if device == "cuda":
        from mgi.models.mamba import resolve_scan_backend

        ours = resolve_scan_backend("auto", device=torch.device("cuda"))
    lengths = (128, 512, 2_048) if args.quick else (1_024, 4_096, 16_384)
    rows = []
    for length in lengths:
        inputs = make_inputs(length, device=device)
        grad_out = torch.randn(BATCH, D_INNER, length,
                               generator=torch.Generator().manual_seed(1)).to(device)
        # check (and warm up) first: float32 sums in another order, so agree on each scale
        _, y_ref, g_ref = forward_backward(inputs, "reference", grad_out)
        _, y_ours, g_ours = forward_backward(inputs, ours, grad_out)
        errors = {"y": max_relative_error(y_ours, y_ref)}
        errors |= {f"d{k}": max_relative_error(g_ours[k], g_ref[k]) for k in ARGS}
        worst = max(errors, key=errors.get)
        if errors[worst] > 1e-4:
            raise SystemExit(f"L={length}: ours and the reference disagree: {worst} {errors}")
        times: dict[str, list[float]] = {ours: [], "reference": []}
        peaks: dict[str, float] = {}
        for r in range(args.repeats):
            order = [ours, "reference"] if r % 2 == 0 else ["reference", ours]
            for backend in order:
                times[backend].append(forward_backward(inputs, backend, grad_out)[0])
                if device == "cuda":
                    peaks[backend] = torch.cuda.max_memory_allocated() / 2**20
        del inputs, grad_out, y_ref, g_ref, y_ours, g_ours
        ours_s, baseline_s = (statistics.median(times[k]) for k in (ours, "reference"))
        if device != "cuda":
            peaks = {k: peak_memory(k, length, threads=args.threads) for k in (ours, "reference")}
        row = {
            "L": length,
            "ours_s": round(ours_s, 4),
            "baseline_s": round(baseline_s, 4),
            "ratio": round(baseline_s / ours_s, 2),
            "limit_s": round(statistics.median(loop_floor(length) for _ in range(3)), 4),
            "ours_peak_mb": round(peaks[ours], 1),
            "baseline_peak_mb": round(peaks["reference"], 1),
            "max_rel_error": float(f"{errors[worst]:.2g}"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    first, last = rows[0], rows[-1]
    result = {
        "name": "scan",
        "ours_s": last["ours_s"],
        "baseline": "reference scan stepped under autograd (as mamba_ssm selective_scan_ref)",
        "ours_backend": ours,
        "device": device,
        "baseline_s": last["baseline_s"],
        "ratio": last["ratio"],
        "limit_s": last["limit_s"],
        "n": last["L"],
        "unit": f"steps (batch {BATCH}, d_inner {D_INNER}, d_state {D_STATE}), forward+backward",
        f"t{short(last['L'])}_over_t{short(first['L'])}": round(
            last["ours_s"] / first["ours_s"], 1
        ),
        "ours_peak_mb": last["ours_peak_mb"],
        "baseline_peak_mb": last["baseline_peak_mb"],
        "max_rel_error": max(row["max_rel_error"] for row in rows),
    }
    return print_result(result, args)


if __name__ == "__main__":
    main()
