"""Time and peak memory of the Mamba gene encoder against a Transformer one as sequences grow.

Ours: `GeneEncoder(GeneEncoderConfig(kind="mamba", recompute=True))`, the setting for long
sequences: bidirectional Mamba blocks (a forward and a backward Mamba per layer), CPU selective
scan, each direction run again in the backward pass instead of stored (as mamba_ssm's fused path
recomputes its conv and delta). Baseline: the same encoder with `kind="transformer"`: PyTorch's
nn.TransformerEncoder (pre-norm, GELU feed-forward of 4x width), whose attention runs through
scaled_dot_product_attention, on a CPU its fused flash-attention kernel (memory linear in L, time
quadratic): the strongest Transformer PyTorch offers on a CPU, so the fair one to beat. Same
embeddings, pooling and projection, same width and depth (d_model 128, 4 heads; Mamba d_state 16,
expand 2; 6 layers as in the TCGA configs), one sequence of L distinct genes with binned values,
loss = mean square of the embedding, forward + backward.

Two more contenders show what the recomputation buys and that the baseline is not denied it:
"mamba_stored" (recompute off, the default for short sequences) and "transformer_checkpoint"
(each Transformer layer under torch.utils.checkpoint, the same trick). Their numbers are in
every row and in the summary's `others`.

Every timed run is a fresh worker process (imports, model, inputs and one warm-up pass at
L = 128 done before the clock starts and before the memory baseline), so that its peak resident
memory (VmHWM, see _memory.py) above that baseline belongs to that run alone: the activations
and temporaries of one training step (the model, its gradients and the inputs excluded).
Contenders alternate, repeat, and keep the median. `saved_bytes_per_token` is what each
model's autograd graph keeps for the backward pass (saved_tensors_hooks, counted once per
storage), the part of the peak that grows with L. One JSON line per L, then the summary line
(ratio and memory at the longest L). `--quick`: L = 512, 1,024, 2,048.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.utils.checkpoint
from _memory import peak_rss_mb, print_result, run_worker, worker_arguments

from mgi.models import GeneEncoder, GeneEncoderConfig

BATCH, N_GENES, N_BINS, WARM_UP = 1, 20_000, 51, 128
N_LAYERS = 6  # the depth of the TCGA cohort configs
OURS, BASELINE = "mamba", "transformer"
CONTENDERS = (OURS, BASELINE, "mamba_stored", "transformer_checkpoint")


class _CheckpointedLayer(torch.nn.TransformerEncoderLayer):
    """A Transformer encoder layer whose forward runs under torch.utils.checkpoint."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return torch.utils.checkpoint.checkpoint(
            super().forward, src, src_mask, src_key_padding_mask, is_causal, use_reentrant=False
        )


def build(contender: str, length: int) -> GeneEncoder:
    """The encoder of `contender`, seeded, sized for sequences of up to `length` genes."""
    torch.manual_seed(0)
    kind = "mamba" if contender.startswith("mamba") else "transformer"
    cfg = GeneEncoderConfig(
        kind=kind,
        vocab_size=N_GENES + 1,
        seq_len=length,
        value_encoding="bins",
        n_bins=N_BINS,
        d_model=128,
        n_layers=N_LAYERS,
        n_heads=4,
        d_state=16,
        expand=2,
        bidirectional=True,
        recompute=contender == OURS,
    )
    model = GeneEncoder(cfg)
    if contender == "transformer_checkpoint":
        for layer in model.transformer.layers:
            layer.__class__ = _CheckpointedLayer  # same parameters, checkpointed forward
    return model


def make_batch(length: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH rows of `length` distinct gene ids (1..N_GENES) and their bin values."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N_GENES, generator=g)[:length] + 1 for _ in range(BATCH)])
    return ids, torch.randint(0, N_BINS, (BATCH, length), generator=g).float()


def step(model: GeneEncoder, ids: torch.Tensor, values: torch.Tensor) -> float:
    """One forward and backward pass; return the loss."""
    loss = model(ids, values).square().mean()
    loss.backward()
    return float(loss.detach())


def worker(kind: str, length: int, *, threads: int) -> None:
    """Time one training step in this fresh process; print seconds and peak MB above the model."""
    torch.set_num_threads(threads)
    model = build(kind, length)
    step(model, *make_batch(WARM_UP, seed=1))  # gradients allocated, thread pools started
    ids, values = make_batch(length)
    before = peak_rss_mb()
    start = time.perf_counter()
    loss = step(model, ids, values)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb() - before, "loss": loss}))


def saved_bytes_per_token(kind: str, length: int = 1_024) -> int:
    """Bytes the autograd graph of one forward pass keeps per token (each storage once)."""
    model = build(kind, length)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*make_batch(length))
    return round(sum(storages.values()) / (BATCH * length))


def main(argv: list[str] | None = None) -> dict:
    args = worker_arguments(__doc__, quick="L = 512, 1,024, 2,048", worker=("KIND", "L"), argv=argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), threads=args.threads)
        return {}
    torch.set_num_threads(args.threads)
    lengths = (512, 1_024, 2_048) if args.quick else (2_048, 8_192, 16_384)
    saved = {kind: saved_bytes_per_token(kind) for kind in CONTENDERS}
    rows = []
    for length in lengths:
        runs: dict[str, list[dict]] = {kind: [] for kind in CONTENDERS}
        for r in range(args.repeats):
            for kind in CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]:
                runs[kind].append(
                    run_worker(__file__, kind, str(length), "--threads", str(args.threads))
                )
            print(
                f"L={length} repeat {r + 1}: "
                + ", ".join(
                    f"{k} {v[-1]['seconds']:.2f} s {v[-1]['peak_mb']:.0f} MB"
                    for k, v in runs.items()
                ),
                file=sys.stderr,
            )
        median = {
            (kind, key): statistics.median(run[key] for run in runs[kind])
            for kind in CONTENDERS
            for key in ("seconds", "peak_mb")
        }
        row = {
            "L": length,
            "ours_s": round(median[OURS, "seconds"], 3),
            "baseline_s": round(median[BASELINE, "seconds"], 3),
            "ratio": round(median[BASELINE, "seconds"] / median[OURS, "seconds"], 2),
            "ours_peak_mb": round(median[OURS, "peak_mb"]),
            "baseline_peak_mb": round(median[BASELINE, "peak_mb"]),
            "memory_ratio": round(median[BASELINE, "peak_mb"] / median[OURS, "peak_mb"], 2),
            "others": {
                kind: {"s": round(median[kind, "seconds"], 3),
                       "peak_mb": round(median[kind, "peak_mb"])}
                for kind in CONTENDERS[2:]
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    last = rows[-1]
    result = {
        "name": "gene_encoder",
        "ours_s": last["ours_s"],
        "ours": "bidirectional Mamba, recompute=True",
        "baseline": "nn.TransformerEncoder (SDPA flash attention), same width and depth",
        "baseline_s": last["baseline_s"],
        "ratio": last["ratio"],
        "n": last["L"],
        "unit": (
            f"genes per sequence (batch {BATCH}), d_model 128, {N_LAYERS} layers, forward+backward"
        ),
        "ours_peak_mb": last["ours_peak_mb"],
        "baseline_peak_mb": last["baseline_peak_mb"],
        "memory_ratio": last["memory_ratio"],
        "peak_mb_by_L": {row["L"]: [row["ours_peak_mb"], row["baseline_peak_mb"]] for row in rows},
        "seconds_by_L": {row["L"]: [row["ours_s"], row["baseline_s"]] for row in rows},
        "saved_bytes_per_token": saved,
        "others": last["others"],
    }
    return print_result(result, args)


if __name__ == "__main__":
    main()
