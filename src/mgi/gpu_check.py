"""GPU check: does the model code run, agree and fit on a GPU? One run, one JSON file.

    python -m mgi.gpu_check --out results/gpu-check.json            (a GPU; `make gpu-check`)
    python -m mgi.gpu_check --out /tmp/check.json --small --device cpu   (a dry run, < 1 min)

Written for a GPU that is lent for a few minutes: it runs from a fresh clone without editing, in
under 8 minutes on one H200, and needs only torch, timm, numpy and pandas (MONAI for the
fine-tuning check; no network, no data, no downloaded weights). Every check catches its own
failure and records it (error, traceback) in the JSON, which is rewritten after each check, so
a broken check, or a run killed part-way, still leaves the others' numbers on disk.

The checks:

scan
    The selective scan (mgi.models.mamba.selective_scan) forward and backward at 16,384 steps
    (batch 1, d_inner 256, d_state 16; inputs laid out and scaled as a Mamba block makes them,
    with D, the z gate, delta_bias and softplus, as benchmarks/scan.py), float32. "ours" is
    mamba_ssm's fused CUDA kernel where it is importable on a GPU, else the project's "chunked"
    backend (the GPU path without mamba_ssm); the "sequential" backend (and "chunked" where ours
    is the kernel) is compared too. Each is checked against the "reference" backend (the
    recurrence stepped under autograd, as mamba_ssm's selective_scan_ref) on the same device:
    for the output and the gradients of the inputs (u, delta, B, C, z) and parameters (A, D,
    delta_bias), max_abs = max |ours - reference| and max_rel = max_abs / max |reference|, which
    must be at most `SCAN_MAX_REL` (stated in the JSON). Times: the median forward and backward
    seconds of repeated passes, after a first pass that warms up and gives the values.
pretrain_demo, pretrain_tcga
    Contrastive pre-training steps as mgi.train.pretrain takes them: ClipModel + ClipLoss +
    AdamW (mgi.train.loop.adamw), built from GeneEncoderConfig / ImageEncoderConfig; the
    forward under bf16 autocast on a GPU (Lightning's bf16-mixed: the loss in float32 on the
    features), backward, gradient clipping at 1, optimiser step. demo: the sizes of config.yaml
    (64 px, 3 channels, ViT patch 8, width 96, depth 4, 4 heads; BiMamba d_model 32 x 2 layers
    over 64 genes; embedding 64; batch 64). tcga: ViT-B/16 at 224 px (timm
    vit_base_patch16_224, random init) and BiMamba d_model 256 x 6 layers over 2,048 genes
    (rank order, so rows end in a few PADs; 51 value bins), embedding 512, batch 128 (the
    TCGA-LGG cohort's model). Steps per second over timed steps after warm-up (with CUDA
    synchronised), the first step's time, peak memory (torch.cuda.max_memory_allocated, from
    before the model is built), and every loss finite. The package's default scan backend
    ("auto") is run first and decides the check; tcga also runs the other project backends
    that differ from it ("sequential", "chunked"), each caught on its own, so an out-of-memory
    default still leaves the numbers of a backend that fits.
finetune_demo
    Segmentation fine-tuning steps as mgi.train.finetune takes them: SegmentationModel of the
    `mgi` variant (ViT + UNETR decoder, gene embedding fused by FiLM), MONAI's DiceCELoss,
    AdamW with the fusion layers at 10x, bf16 autocast on a GPU, gradient clipping; demo sizes,
    batch 16. Loss finite, time per step, peak memory. Without MONAI the check says so and is
    marked unavailable (not ok); the others still run.

`--small` shrinks every size (scan length, models, batches, steps) so that all of it runs on a
CPU in well under a minute; the JSON says so. The JSON also records the device, torch / CUDA
versions, whether mamba_ssm is importable, which scan backend ran, and an overall "ok" (every
check passed). Exit status: 0 when ok, 1 when a check failed, 2 when CUDA was asked for and
there is none.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import logging
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mgi.models.gene_encoder import GeneEncoderConfig
    from mgi.models.image_encoder import ImageEncoderConfig

log = logging.getLogger(__name__)

CHECKS = ("scan", "pretrain_demo", "pretrain_tcga", "finetune_demo")
# max |ours - reference| / max |reference| allowed per tensor (output and each gradient). The
# CPU benchmark holds the project's backends to 1e-4; mamba_ssm's kernel sums dA, dB, dC and
# dD with atomics in another order and its own tests allow rtol 6e-4 in float32, so 1e-3 here.
SCAN_MAX_REL = 1e-3
SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SCAN_INPUTS = ("u", "delta", "B", "C", "z")
SCAN_PARAMETERS = ("A", "D", "delta_bias")
# The vocabularies: the demo's 63 genes and TCGA's protein-coding genes (GENCODE v36, about
# 19,960), each after the 3 special tokens (<pad>, <cls>, <mask>).
DEMO_VOCAB, TCGA_VOCAB = 66, 20_000
PAD, CLS, N_SPECIALS = 0, 1, 3


class CheckUnavailable(Exception):
    """A check cannot run here (a package is missing); recorded as status "unavailable"."""


class NoCudaError(RuntimeError):
    """CUDA was asked for and torch sees no GPU."""


@dataclass(frozen=True)
class ScanSize:
    """Shapes and repeats of the scan check."""

    length: int
    batch: int
    d_inner: int
    d_state: int
    repeats: int


@dataclass(frozen=True)
class TrainCase:
    """One training-step check: the model configs, the batch and how many steps to time."""

    name: str
    gene: GeneEncoderConfig
    image: ImageEncoderConfig
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    timed_steps: int
    padded: bool = False  # rows end in PADs (rank order drops unexpressed genes)
    scan_backends: tuple[str, ...] = ("auto",)  # the first decides the check
    max_timed_seconds: float = 90.0  # stop timing early past this (at least 2 timed steps)


# The models of the pre-training checks: GeneEncoderConfig and ImageEncoderConfig fields, and
# what --small replaces in each. demo: config.yaml (model.*, expression.*, imaging.mri.image_px,
# 3 sequences); tcga: cohorts/tcga-lgg.yaml with the schema's defaults, its ViT-B/16 at 224 px
# (timm vit_base_patch16_224's shape, random init). tests/test_gpu_check.py checks both against
# the config files.
MODEL_SIZES = {
    "demo": {
        "gene": dict(kind="mamba", vocab_size=DEMO_VOCAB, seq_len=64,
                     value_encoding="continuous", n_bins=51, d_model=32, n_layers=2, d_state=8,
                     d_conv=4, expand=2, bidirectional=True, n_heads=4, dropout=0.2,
                     embed_dim=64, scan_backend="auto", recompute=False),
        "image": dict(model_name="vit_tiny_patch16_224", img_size=64, patch_size=8, in_chans=3,
                      width=96, depth=4, num_heads=4, embed_dim=64, weights=None,
                      pos_embed="sincos"),
        "small_gene": dict(vocab_size=20, seq_len=16, d_model=16, n_layers=1, d_state=4,
                           embed_dim=16),
        "small_image": dict(img_size=16, patch_size=4, width=32, depth=2, num_heads=2,
                            embed_dim=16),
    },
    "tcga": {
        "gene": dict(kind="mamba", vocab_size=TCGA_VOCAB, seq_len=2048, value_encoding="bins",
                     n_bins=51, d_model=256, n_layers=6, d_state=16, d_conv=4, expand=2,
                     bidirectional=True, n_heads=4, dropout=0.0, embed_dim=512,
                     scan_backend="auto", recompute=False),
        "image": dict(model_name="vit_base_patch16_224", img_size=224, patch_size=16, in_chans=3,
                      width=None, depth=None, num_heads=None, embed_dim=512, weights=None,
                      pos_embed="sincos"),
        "small_gene": dict(vocab_size=100, seq_len=48, d_model=32, n_layers=2, d_state=8,
                           embed_dim=32),
        "small_image": dict(img_size=32, patch_size=8, width=48, depth=2, num_heads=2,
                            embed_dim=32),
    },
}


def model_configs(name: str, *, small: bool = False
                  ) -> tuple[GeneEncoderConfig, ImageEncoderConfig]:
    """The gene encoder's and the ViT's configs of MODEL_SIZES[name] (shrunk if small)."""
    from mgi.models.gene_encoder import GeneEncoderConfig
    from mgi.models.image_encoder import ImageEncoderConfig

    sizes = MODEL_SIZES[name]
    gene = {**sizes["gene"], **(sizes["small_gene"] if small else {})}
    image = {**sizes["image"], **(sizes["small_image"] if small else {})}
    return GeneEncoderConfig(**gene), ImageEncoderConfig(**image)


def demo_gene_config(*, small: bool = False) -> GeneEncoderConfig:
    """The demo's gene encoder."""
    return model_configs("demo", small=small)[0]


def demo_image_config(*, small: bool = False) -> ImageEncoderConfig:
    """The demo's ViT."""
    return model_configs("demo", small=small)[1]


def tcga_gene_config(*, small: bool = False) -> GeneEncoderConfig:
    """TCGA-LGG's gene encoder."""
    return model_configs("tcga", small=small)[0]


def tcga_image_config(*, small: bool = False) -> ImageEncoderConfig:
    """ViT-B/16 at 224 px, 3 MR sequences."""
    return model_configs("tcga", small=small)[1]


def scan_size(*, small: bool) -> ScanSize:
    """The scan check's shapes (small: a length that leaves ragged final chunks)."""
    if small:
        return ScanSize(length=300, batch=1, d_inner=32, d_state=4, repeats=1)
    return ScanSize(length=16_384, batch=1, d_inner=256, d_state=16, repeats=3)


def pretrain_cases(*, small: bool) -> dict[str, TrainCase]:
    """The two pre-training checks (lr and weight decay: config.yaml and tcga-lgg.yaml)."""
    warmup, timed = (1, 2) if small else (5, 20)
    return {
        "pretrain_demo": TrainCase(
            "demo", demo_gene_config(small=small), demo_image_config(small=small),
            batch_size=8 if small else 64, lr=1e-3, weight_decay=0.05,
            warmup_steps=warmup, timed_steps=timed,
        ),
        "pretrain_tcga": TrainCase(
            "tcga", tcga_gene_config(small=small), tcga_image_config(small=small),
            batch_size=8 if small else 128, lr=3e-4, weight_decay=0.05,
            warmup_steps=warmup if small else 2, timed_steps=timed if small else 10,
            padded=True, scan_backends=("auto", "sequential", "chunked"),
        ),
    }


def finetune_case(*, small: bool) -> TrainCase:
    """The fine-tuning check: the demo's encoders, finetune.* defaults (batch 16, lr 1e-3)."""
    return TrainCase(
        "demo", demo_gene_config(small=small), demo_image_config(small=small),
        batch_size=4 if small else 16, lr=1e-3, weight_decay=1e-4,
        warmup_steps=1, timed_steps=2 if small else 10,
    )


# ---------------------------------------------------------------------------------------------
# helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    """Peak allocated CUDA memory since the last reset (MB); None on a CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error_text(err: BaseException, limit: int = 2000) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + " ..."


def _is_oom(err: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError: torch.OutOfMemoryError's older name, still an alias
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def _json_safe(value: Any) -> Any:
    """value with non-finite floats as None, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_json(result: dict, path: Path) -> None:
    from mgi.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------
# environment


def _package_state(module: str, dist: str | None = None) -> dict:
    """{"available", "version", "error"} of an importable package."""
    from importlib import metadata

    try:
        importlib.import_module(module)
    except Exception as err:  # ImportError, or a CUDA extension that fails to load
        return {"available": False, "version": None, "error": _error_text(err, 500)}
    try:
        version = metadata.version(dist or module.split(".")[0])
    except metadata.PackageNotFoundError:
        version = None
    return {"available": True, "version": version, "error": None}


def _git_commit() -> str | None:
    """The commit of the checkout this package is imported from, where it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict:
    """Versions, the device and which optional packages import."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "mamba_ssm": _package_state("mamba_ssm.ops.selective_scan_interface", "mamba_ssm"),
        "monai": _package_state("monai"),
        "timm": _package_state("timm"),
        "git_commit": _git_commit(),
        "platform": platform.platform(),
    }
    env["device_name"] = platform.processor() or platform.machine() or "cpu"
    if device.type == "cuda":
        try:
            props = torch.cuda.get_device_properties(device)
            env |= {
                "device_name": props.name,
                "device_memory_gb": round(props.total_memory / 2**30, 1),
                "capability": f"{props.major}.{props.minor}",
                "device_count": torch.cuda.device_count(),
                "bf16_supported": torch.cuda.is_bf16_supported(),
                "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            }
        except Exception as err:  # the checks will meet the same problem and record it
            env["device_error"] = _error_text(err, 500)
    return env


# ---------------------------------------------------------------------------------------------
# scan


def _scan_inputs(size: ScanSize, device: torch.device, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scan inputs as a Mamba block hands them over (as benchmarks/scan.py), requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def sequence_major(channels: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(size.batch, size.length, channels, generator=g) * scale
        return x.to(device).transpose(1, 2)  # (b, channels, L) view, as the block makes

    dt = torch.exp(torch.rand(size.d_inner, generator=g) * math.log(100) + math.log(1e-3))
    tensors = {
        "u": sequence_major(size.d_inner),
        "delta": sequence_major(size.d_inner, 0.1),  # dt_proj output, before its bias
        "A": -torch.arange(1.0, size.d_state + 1).repeat(size.d_inner, 1).to(device),
        "B": sequence_major(size.d_state),
        "C": sequence_major(size.d_state),
        "D": torch.ones(size.d_inner, device=device),
        "z": sequence_major(size.d_inner),
        "delta_bias": (dt + torch.log(-torch.expm1(-dt))).to(device),  # softplus: 1e-3..1e-1
    }
    return {k: v.detach().requires_grad_() for k, v in tensors.items()}


def _scan_pass(inputs: dict[str, torch.Tensor], backend: str, grad_out: torch.Tensor,
               device: torch.device) -> tuple[float, float, float | None, torch.Tensor, dict]:
    """(forward s, backward s, peak MB, output, gradients) of one pass."""
    from mgi.models.mamba import selective_scan

    for t in inputs.values():
        t.grad = None
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    y = selective_scan(**inputs, delta_softplus=True, backend=backend)
    _sync(device)
    middle = time.perf_counter()
    y.backward(grad_out)
    _sync(device)
    end = time.perf_counter()
    grads = {k: v.grad.detach().clone() for k, v in inputs.items()}
    return middle - start, end - middle, _peak_mb(device), y.detach(), grads


def scan_backends(device: torch.device) -> tuple[str, list[str]]:
    """(ours, every project backend compared with the reference, ours first) on `device`."""
    from mgi.models.mamba import _mamba_ssm_scan

    ours = "cuda" if device.type == "cuda" and _mamba_ssm_scan() is not None else "chunked"
    return ours, [ours] + [b for b in ("chunked", "sequential") if b != ours]


def check_scan(*, device: torch.device, small: bool) -> dict:
    """Each scan backend against the reference on `device`: differences and times."""
    from mgi.models.mamba import resolve_scan_backend

    size = scan_size(small=small)
    ours, backends = scan_backends(device)
    inputs = _scan_inputs(size, device)
    grad_out = torch.randn(size.batch, size.d_inner, size.length,
                           generator=torch.Generator().manual_seed(1)).to(device)
    log.info("scan: %d steps, reference vs %s", size.length, ", ".join(backends))
    _, _, ref_peak, y_ref, g_ref = _scan_pass(inputs, "reference", grad_out, device)
    reference = {"y": y_ref} | {f"d{k}": g_ref[k] for k in SCAN_ARGS}
    scale = {k: float(v.abs().max()) for k, v in reference.items()}
    times: dict[str, list[tuple[float, float]]] = {"reference": []}
    peaks = {"reference": ref_peak}
    rows: dict[str, dict] = {}
    for backend in backends:
        try:
            _, _, peaks[backend], y, grads = _scan_pass(inputs, backend, grad_out, device)
            ours_values = {"y": y} | {f"d{k}": grads[k] for k in SCAN_ARGS}
            max_abs = {k: float((ours_values[k] - reference[k]).abs().max()) for k in reference}
            max_rel = {k: max_abs[k] / scale[k] if scale[k] > 0 else max_abs[k]
                       for k in reference}
            worst = max(max_rel, key=lambda k: max_rel[k])
            within = all(math.isfinite(v) and v <= SCAN_MAX_REL for v in max_rel.values())
            rows[backend] = {"ok": within, "max_abs": max_abs, "max_rel": max_rel,
                             "worst": worst, "worst_rel": max_rel[worst]}
            times[backend] = []
            del y, grads, ours_values
        except Exception as err:
            log.exception("scan backend %s failed", backend)
            rows[backend] = {"ok": False, "error": _error_text(err)}
        _free(device)
    del y_ref, g_ref, reference
    timed = ["reference"] + [b for b in backends if b in times]
    timing_error = None
    try:
        for r in range(size.repeats):
            for backend in timed if r % 2 == 0 else timed[::-1]:  # alternate: drift is shared
                forward_s, backward_s, peak, *_ = _scan_pass(inputs, backend, grad_out, device)
                times[backend].append((forward_s, backward_s))
                peaks[backend] = peak
    except Exception as err:  # keep the differences measured above
        log.exception("scan timing failed")
        timing_error = _error_text(err)
    medians = {b: (statistics.median(f for f, _ in times[b]),
                   statistics.median(s for _, s in times[b])) for b in timed if times[b]}
    reference_times = medians.get("reference", (math.nan, math.nan))
    for backend in timed[1:]:
        forward_s, backward_s = medians.get(backend, (math.nan, math.nan))
        rows[backend] |= {"forward_s": forward_s, "backward_s": backward_s,
                          "speedup": sum(reference_times) / (forward_s + backward_s),
                          "peak_memory_mb": peaks[backend]}
    ok = timing_error is None and all(row["ok"] for row in rows.values())
    mine = rows[ours]
    log.info("scan: %s worst %s rel %.2g, %s", ours, mine.get("worst"), mine.get("worst_rel", -1),
             "ok" if ok else "FAILED")
    return {
        "ok": ok,
        "timing_error": timing_error,
        "backend": ours,
        "auto_backend": resolve_scan_backend("auto", device=device),
        "length": size.length, "batch": size.batch, "d_inner": size.d_inner,
        "d_state": size.d_state, "dtype": "float32", "repeats": size.repeats,
        "tolerance": {
            "max_rel": SCAN_MAX_REL,
            "definition": "per tensor (output y and the gradient dX of each input X): max_abs = "
                          "max |ours - reference|, max_rel = max_abs / max |reference|; "
                          "pass when every max_rel <= tolerance",
            "inputs": list(SCAN_INPUTS), "parameters": list(SCAN_PARAMETERS),
        },
        "reference": {"forward_s": reference_times[0], "backward_s": reference_times[1],
                      "peak_memory_mb": peaks["reference"]},
        "backends": rows,
    }


# ---------------------------------------------------------------------------------------------
# training steps


def _gene_batch(cfg: GeneEncoderConfig, batch: int, *, padded: bool, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (CLS first, trailing PADs if padded) and values of `batch` random patients."""
    length = cfg.seq_len
    tokens = torch.randint(N_SPECIALS, cfg.vocab_size, (batch, length), generator=generator)
    tokens[:, 0] = CLS
    if cfg.value_encoding == "bins":
        values = torch.randint(1, cfg.n_bins, (batch, length), generator=generator).float()
    else:
        values = torch.randn(batch, length, generator=generator)
    values[:, 0] = 0.0
    if padded:  # 90-100% of the genes expressed; the rest are dropped, leaving trailing PADs
        kept = torch.randint(int(0.9 * length), length + 1, (batch, 1), generator=generator)
        pad = torch.arange(length) >= kept
        tokens[pad], values[pad] = PAD, 0.0
    return tokens, values


def _images(cfg: ImageEncoderConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=generator)


def _masks(cfg: ImageEncoderConfig, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Binary masks (batch, 1, H, W), one random square each."""
    size = cfg.img_size
    masks = torch.zeros(batch, 1, size, size)
    for mask in masks:
        side = int(torch.randint(2, max(3, size // 2), (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=generator))
        mask[:, top:top + side, left:left + side] = 1.0
    return masks


def _time_steps(step: Callable[[], torch.Tensor], case: TrainCase, device: torch.device) -> dict:
    """Run warm-up then timed steps; steps/s, first step s, losses (read after timing)."""
    losses = []
    _sync(device)
    start = time.perf_counter()
    losses.append(step())
    _sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(case.warmup_steps - 1):
        losses.append(step())
    _sync(device)
    start = time.perf_counter()
    timed = 0
    while timed < case.timed_steps:
        losses.append(step())
        timed += 1
        if timed >= 2 and time.perf_counter() - start > case.max_timed_seconds:
            log.warning("%s: stopped timing after %d steps (over %.0f s)", case.name, timed,
                        case.max_timed_seconds)
            break
    _sync(device)
    elapsed = time.perf_counter() - start
    values = [float(v) for v in losses]
    finite = all(math.isfinite(v) for v in values)
    return {
        "ok": finite,
        "steps_per_s": timed / elapsed,
        "step_s": elapsed / timed,
        "first_step_s": first_step_s,
        "warmup_steps": case.warmup_steps,
        "timed_steps": timed,
        "peak_memory_mb": _peak_mb(device),
        "loss_first": values[0],
        "loss_last": values[-1],
        "loss_finite": finite,
    }


def _model_summary(model: torch.nn.Module, case: TrainCase) -> dict:
    gene, image = case.gene, case.image
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gene_encoder": dataclasses.asdict(gene),
        "image_encoder": dataclasses.asdict(image),
    }


def _precision(device: torch.device) -> str:
    return "bf16 autocast" if device.type == "cuda" else "float32"


def _pretrain_attempt(case: TrainCase, backend: str, device: torch.device) -> dict:
    """Build the CLIP model with scan backend `backend` and time its training steps."""
    from mgi.models import ClipLoss, ClipModel
    from mgi.train.loop import adamw, autocast

    torch.manual_seed(0)
    _reset_peak(device)
    gene = dataclasses.replace(case.gene, scan_backend=backend)
    model = ClipModel(gene, case.image, init_temperature=0.07).to(device)
    model.train()
    optimizer = adamw(model, lr=case.lr, weight_decay=case.weight_decay)
    loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(0)
    images = _images(case.image, case.batch_size, g).to(device)
    tokens, values = (t.to(device) for t in _gene_batch(gene, case.batch_size,
                                                         padded=case.padded, generator=g))
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with autocast(device):  # as Fabric's bf16-mixed: the model's forward only
            image_f, gene_f, scale = model(images, tokens, values)
        loss = loss_fn(image_f.float(), gene_f.float(), scale.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    result = _time_steps(step, case, device)
    return {"model": _model_summary(model, case)} | result


def check_pretrain(case: TrainCase, *, device: torch.device) -> dict:
    """Pre-training steps of `case` with each of its scan backends; the first decides."""
    from mgi.models.mamba import resolve_scan_backend

    resolved: list[str] = []
    for backend in case.scan_backends:
        name = resolve_scan_backend(backend, device=device)
        if name not in resolved:
            resolved.append(name)
    attempts = []
    for backend in resolved:
        log.info("pretrain %s: batch %d, scan backend %s, %s", case.name, case.batch_size,
                 backend, _precision(device))
        try:
            attempt = {"scan_backend": backend} | _pretrain_attempt(case, backend, device)
            log.info("pretrain %s (%s): %.3g steps/s, peak %s MB, loss %.4g -> %.4g", case.name,
                     backend, attempt["steps_per_s"], attempt["peak_memory_mb"],
                     attempt["loss_first"], attempt["loss_last"])
        except Exception as err:
            oom = _is_oom(err)
            log.warning("pretrain %s (%s) failed: %s", case.name, backend,
                        "out of memory" if oom else _error_text(err, 300))
            attempt = {"scan_backend": backend, "ok": False, "out_of_memory": oom,
                       "peak_memory_mb": _peak_mb(device), "error": _error_text(err)}
            if not oom:
                attempt["traceback"] = traceback.format_exc(limit=-8)
        _free(device)
        attempts.append(attempt)
    default = attempts[0]
    summary = {k: default.get(k) for k in ("steps_per_s", "step_s", "first_step_s",
                                            "warmup_steps", "timed_steps", "peak_memory_mb",
                                            "loss_first", "loss_last", "loss_finite")}
    return {
        "ok": bool(default["ok"]),
        "scan_backend": default["scan_backend"],
        "ok_backends": [a["scan_backend"] for a in attempts if a["ok"]],
        "batch_size": case.batch_size,
        "precision": _precision(device),
        "padded_sequences": case.padded,
        **summary,
        "model": next((a["model"] for a in attempts if "model" in a), None),
        "attempts": [{k: v for k, v in a.items() if k != "model"} for a in attempts],
    }


def check_finetune(case: TrainCase, *, device: torch.device) -> dict:
    """Fine-tuning steps of the `mgi` variant (FiLM fusion) with DiceCELoss."""
    try:
        importlib.import_module("monai")
    except ImportError as err:
        raise CheckUnavailable(
            f"monai is not installed ({_error_text(err, 200)}): the fine-tuning check needs "
            f"MONAI's UNETR blocks and DiceCELoss (pip install 'monai>=1.4', pure Python, no "
            f"further dependencies beyond torch and numpy)"
        ) from err
    from monai.losses import DiceCELoss

    from mgi.models import SegmentationModel
    from mgi.train.loop import adamw, autocast

    torch.manual_seed(0)
    _reset_peak(device)
    model = SegmentationModel(case.image, case.gene, fusion="film", decoder_channels=16)
    model.to(device).train()
    optimizer = adamw(model, lr=case.lr, weight_decay=case.weight_decay, fusion_lr_scale=10.0)
    loss_fn = DiceCELoss(sigmoid=True)
    g = torch.Generator().manual_seed(0)
    images = _images(case.image, case.batch_size, g).to(device)
    masks = _masks(case.image, case.batch_size, g).to(device)
    tokens, values = (t.to(device) for t in _gene_batch(case.gene, case.batch_size,
                                                         padded=False, generator=g))
    shapes = {}

    def step() -> torch.Tensor:
        with autocast(device):
            logits = model(images, tokens, values)
            loss = loss_fn(logits.float(), masks)
        shapes["logits"] = list(logits.shape)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    log.info("finetune %s: mgi variant, batch %d, %s", case.name, case.batch_size,
             _precision(device))
    result = _time_steps(step, case, device)
    shape_ok = shapes["logits"] == list(masks.shape)
    log.info("finetune %s: %.3g s/step, peak %s MB, loss %.4g -> %.4g", case.name,
             result["step_s"], result["peak_memory_mb"], result["loss_first"],
             result["loss_last"])
    return result | {
        "ok": result["ok"] and shape_ok,
        "variant": "mgi",
        "fusion": "film",
        "loss": "monai.losses.DiceCELoss(sigmoid=True)",
        "batch_size": case.batch_size,
        "precision": _precision(device),
        "logits_shape": shapes["logits"],
        "model": _model_summary(model, case),
    }


# ---------------------------------------------------------------------------------------------
# runner


def _run_one(name: str, fn: Callable[[], dict], device: torch.device) -> dict:
    """fn()'s result with ok and seconds, or its error; never raises (but for interrupts)."""
    start = time.perf_counter()
    try:
        result = fn()
        result.setdefault("ok", True)
        result = {"status": "passed" if result["ok"] else "failed", "error": None} | result
    except CheckUnavailable as err:
        log.warning("%s unavailable: %s", name, err)
        result = {"ok": False, "status": "unavailable", "error": str(err)}
    except Exception as err:
        log.exception("%s failed", name)
        result = {"ok": False, "status": "failed", "error": _error_text(err),
                  "traceback": traceback.format_exc(limit=-12)}
    result["seconds"] = round(time.perf_counter() - start, 3)
    _free(device)
    return result


def run(*, out: Path, small: bool = False, device: str = "cuda",
        checks: tuple[str, ...] = CHECKS) -> dict:
    """Run the checks on `device`, writing the JSON to `out` after each; return it.

    Raises NoCudaError when `device` is "cuda" and torch sees no GPU (see `main`).
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; expected some of {list(CHECKS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise NoCudaError(
            f"CUDA was requested (--device cuda) but torch {torch.__version__} "
            f"(CUDA build {torch.version.cuda}) sees no GPU: torch.cuda.is_available() is "
            f"False. Run on a GPU machine, or use --device cpu --small for a dry run."
        )
    dev = torch.device(device)
    start = time.perf_counter()
    env = environment(dev)
    result: dict[str, Any] = {
        "name": "gpu-check",
        "ok": False,
        "complete": False,
        "small": small,
        "device": device,
        "device_name": env["device_name"],
        "torch": env["torch"],
        "cuda": env["cuda"],
        "mamba_ssm_available": env["mamba_ssm"]["available"],
        "monai_available": env["monai"]["available"],
        "scan_backend": None,
        "model_scan_backend": None,
        # timezone.utc, not datetime.UTC: a GPU machine's system python may be older than 3.11
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "seconds": None,
        "failed": [],
        "unavailable": [],
        "environment": env,
        "checks": {},
    }
    try:
        from mgi.models.mamba import resolve_scan_backend

        result["scan_backend"] = scan_backends(dev)[0]
        result["model_scan_backend"] = resolve_scan_backend("auto", device=dev)
    except Exception as err:  # reported again by the checks that need it
        log.warning("cannot resolve the scan backend: %s", _error_text(err, 300))
    log.info("gpu-check on %s (%s)%s, mamba_ssm %s, checks: %s", device, env["device_name"],
             ", small" if small else "",
             "importable" if env["mamba_ssm"]["available"] else "not importable",
             ", ".join(checks))
    _write_json(result, out)
    cases = pretrain_cases(small=small)
    runners: dict[str, Callable[[], dict]] = {
        "scan": lambda: check_scan(device=dev, small=small),
        "pretrain_demo": lambda: check_pretrain(cases["pretrain_demo"], device=dev),
        "pretrain_tcga": lambda: check_pretrain(cases["pretrain_tcga"], device=dev),
        "finetune_demo": lambda: check_finetune(finetune_case(small=small), device=dev),
    }
    for name in checks:
        outcome = _run_one(name, runners[name], dev)
        result["checks"][name] = outcome
        if outcome["status"] == "unavailable":
            result["unavailable"].append(name)
        elif not outcome["ok"]:
            result["failed"].append(name)
        result["seconds"] = round(time.perf_counter() - start, 1)
        _write_json(result, out)
    result["ok"] = all(result["checks"][name]["ok"] for name in checks)
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - start, 1)
    _write_json(result, out)
    log.info("gpu-check %s in %.0f s%s", "ok" if result["ok"] else "NOT ok", result["seconds"],
             "".join(f"; {k}: {', '.join(v)}" for k in ("failed", "unavailable")
                     if (v := result[k])))
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: run the checks, print the JSON path; 0 ok, 1 a check failed, 2 no CUDA."""
    parser = argparse.ArgumentParser(
        prog="python -m mgi.gpu_check",
        description=__doc__.split("\n")[0],
        epilog="Each check is described in the module docstring (pydoc mgi.gpu_check).",
    )
    parser.add_argument("--out", type=Path, default=Path("results/gpu-check.json"),
                        help="the JSON file to write (default: %(default)s)")
    parser.add_argument("--small", action="store_true",
                        help="shrink every size so that all checks run on a CPU in < 1 min")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where the checks run (default: %(default)s)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help="comma-separated subset of: %(default)s")
    args = parser.parse_args(argv)
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip())
    if unknown := sorted(set(checks) - set(CHECKS)):
        parser.error(f"--checks: unknown {unknown}; expected some of {', '.join(CHECKS)}")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            stream=sys.stderr)
    try:
        result = run(out=args.out, small=args.small, device=args.device, checks=checks)
    except NoCudaError as err:  # no CUDA: say so, and leave a JSON that says so too
        print(f"gpu-check: {err}", file=sys.stderr)
        _write_json({"name": "gpu-check", "ok": False, "complete": False, "small": args.small,
                     "device": args.device, "error": str(err),
                     "torch": torch.__version__, "cuda": torch.version.cuda}, args.out)
        return 2
    print(args.out)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
