"""How fast the pure-PyTorch selective scan runs forward and backward on a CPU.

Ours: `selective_scan(..., backend="sequential")`, the CPU fast path (one loop over the
sequence with a hand-written backward, see mgi.models.mamba._SequentialScan). Baseline: the
"reference" backend, the same recurrence stepped under autograd as mamba_ssm's
`selective_scan_ref` does: it is what users without CUDA run today, so it is the fair one to
beat. The closed-form "chunked" backend (the GPU path without mamba_ssm) is timed too, for
the record. limit_s: the recurrence's loop alone (forward, no autograd), a floor for any
stepwise scan. Shapes are those of a gene encoder layer (batch 16, d_inner 128, d_state 16,
L = 512 genes; `--quick`: L = 128). Runs alternate, repeat, and keep the median; outputs and
gradients are checked to agree first. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mgi.models.mamba import selective_scan


def make_inputs(batch: int, d_inner: int, d_state: int, length: int) -> list[torch.Tensor]:
    """Random scan inputs with gradients, in mamba_ssm's shapes."""
    g = torch.Generator().manual_seed(0)
    shapes = [(batch, d_inner, length), (batch, d_inner, length), (d_inner, d_state),
              (batch, d_state, length), (batch, d_state, length), (d_inner,),
              (batch, d_inner, length), (d_inner,)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    tensors[2] = -torch.rand(d_inner, d_state, generator=g) * 4  # A: negative real parts
    return [t.requires_grad_() for t in tensors]


def forward_backward(inputs: list[torch.Tensor], backend: str) -> float:
    """Seconds of one forward and backward pass."""
    for t in inputs:
        t.grad = None
    start = time.perf_counter()
    y = selective_scan(*inputs, delta_softplus=True, backend=backend)
    y.sum().backward()
    return time.perf_counter() - start


def loop_floor(inputs: list[torch.Tensor]) -> float:
    """Seconds of the bare recurrence h = a h + b over precomputed a, b (no autograd)."""
    u, delta, A, B = (t.detach() for t in inputs[:4])
    with torch.no_grad():
        a = torch.exp(delta.permute(2, 0, 1).unsqueeze(-1) * A).contiguous()
        b = ((delta * u).permute(2, 0, 1).unsqueeze(-1) * B.permute(2, 0, 1).unsqueeze(2))
        b = b.contiguous()
        start = time.perf_counter()
        h = torch.zeros_like(b[0])
        for t in range(a.shape[0]):
            h = torch.addcmul(b[t], a[t], h)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="L = 128")
    args = parser.parse_args()
    length, repeats = (128, 3) if args.quick else (512, 3)
    torch.set_num_threads(2)
    inputs = make_inputs(16, 128, 16, length)

    ref = selective_scan(*inputs, delta_softplus=True, backend="reference")
    ours = selective_scan(*inputs, delta_softplus=True, backend="sequential")
    # float32 sums in a different order: agree to 1e-4 of the output's scale
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))

    times: dict[str, list[float]] = {"sequential": [], "reference": [], "chunked": []}
    floors = []
    for _ in range(repeats):
        for backend in times:
            times[backend].append(forward_backward(inputs, backend))
        floors.append(loop_floor(inputs))
    median = {k: statistics.median(v) for k, v in times.items()}
    for backend, seconds in median.items():
        print(f"{backend:>10}: {seconds:.3f} s forward+backward")
    print(json.dumps({
        "name": "selective_scan_cpu",
        "ours_s": round(median["sequential"], 4),
        "baseline": "reference scan under autograd (as mamba_ssm selective_scan_ref)",
        "baseline_s": round(median["reference"], 4),
        "ratio": round(median["reference"] / median["sequential"], 2),
        "limit_s": round(statistics.median(floors), 4),
        "chunked_s": round(median["chunked"], 4),
        "n": 16 * length,
        "unit": "gene tokens (batch 16 x L), d_inner 128, d_state 16, forward+backward",
    }))


if __name__ == "__main__":
    main()
