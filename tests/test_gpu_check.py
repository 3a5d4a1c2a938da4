"""`python -m mgi.gpu_check`: every check runs and passes in small CPU mode, a broken check is
recorded while the others still run, the demo / TCGA sizes are those of the shipped configs."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mgi import gpu_check
from mgi.options import Config, build

REPO = Path(__file__).resolve().parents[1]


def _strict_json(path: Path) -> dict:
    """The file's JSON; NaN or Infinity in it fail the test."""
    def refuse(constant: str):
        raise AssertionError(f"{path} holds {constant}, not strict JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a busy machine: one intra-op thread is several times faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, one_thread) -> tuple[int, dict]:
    """main() in small CPU mode: (exit status, the JSON it wrote)."""
    out = tmp_path_factory.mktemp("gpu-check") / "gpu-check.json"
    code = gpu_check.main(["--out", str(out), "--small", "--device", "cpu"])
    return code, _strict_json(out)


def test_small_cpu_run_passes_every_check_and_says_how_it_ran(small_run):
    code, result = small_run
    assert code == 0
    assert result["ok"] is True and result["complete"] is True
    assert result["small"] is True and result["device"] == "cpu"
    assert result["failed"] == [] and result["unavailable"] == []
    assert set(result["checks"]) == set(gpu_check.CHECKS)
    assert result["torch"] == torch.__version__
    assert result["cuda"] == torch.version.cuda
    assert isinstance(result["mamba_ssm_available"], bool)
    assert result["device_name"]
    assert result["scan_backend"] == "chunked"  # no mamba_ssm kernel on a CPU
    assert result["model_scan_backend"] == "sequential"  # what "auto" means on a CPU
    for name, check in result["checks"].items():
        assert check["ok"] is True and check["status"] == "passed", name
        assert check["error"] is None and check["seconds"] > 0, name


def test_scan_backends_agree_with_the_reference_within_the_stated_tolerance(small_run):
    scan = small_run[1]["checks"]["scan"]
    tolerance = scan["tolerance"]["max_rel"]
    assert tolerance == gpu_check.SCAN_MAX_REL
    assert scan["length"] == gpu_check.scan_size(small=True).length
    assert set(scan["backends"]) == {"chunked", "sequential"}
    expected = {"y"} | {f"d{name}" for name in gpu_check.SCAN_ARGS}
    for backend, row in scan["backends"].items():
        assert row["ok"] is True, backend
        assert set(row["max_rel"]) == set(row["max_abs"]) == expected, backend
        assert all(0 <= value <= tolerance for value in row["max_rel"].values()), backend
        assert row["worst_rel"] == max(row["max_rel"].values())
        assert row["forward_s"] > 0 and row["backward_s"] > 0 and row["speedup"] > 0
    assert scan["reference"]["forward_s"] > 0 and scan["reference"]["backward_s"] > 0


def test_training_steps_are_timed_with_finite_losses(small_run):
    checks = small_run[1]["checks"]
    for name in ("pretrain_demo", "pretrain_tcga", "finetune_demo"):
        check = checks[name]
        assert check["steps_per_s"] > 0 and check["step_s"] > 0, name
        assert check["timed_steps"] >= 2 and check["first_step_s"] > 0, name
        assert check["loss_finite"] is True, name
        assert math.isfinite(check["loss_first"]) and math.isfinite(check["loss_last"]), name
        assert check["peak_memory_mb"] is None, name  # CUDA only
        assert check["model"]["parameters"] > 0, name
    assert checks["pretrain_demo"]["scan_backend"] == "sequential"
    tcga = checks["pretrain_tcga"]
    assert [a["scan_backend"] for a in tcga["attempts"]] == ["sequential", "chunked"]
    assert all(a["ok"] and a["steps_per_s"] > 0 for a in tcga["attempts"])
    finetune = checks["finetune_demo"]
    assert finetune["variant"] == "mgi" and finetune["fusion"] == "film"
    case = gpu_check.finetune_case(small=True)
    assert finetune["logits_shape"] == [case.batch_size, 1, case.image.img_size,
                                        case.image.img_size]


def test_a_broken_check_is_recorded_and_the_others_still_run(tmp_path: Path, monkeypatch,
                                                              one_thread):
    out = tmp_path / "gpu-check.json"
    seen_on_disk = {}

    def broken(**_):
        raise RuntimeError("scan kernel exploded")

    def finetune_reading_the_file(case, *, device):
        seen_on_disk.update(_strict_json(out)["checks"])  # written after every check
        return {"ok": True, "steps_per_s": 1.0}

    monkeypatch.setattr(gpu_check, "check_scan", broken)
    monkeypatch.setattr(gpu_check, "check_finetune", finetune_reading_the_file)
    code = gpu_check.main(["--out", str(out), "--small", "--device", "cpu"])
    result = _strict_json(out)
    assert code == 1
    assert result["ok"] is False and result["complete"] is True
    assert result["failed"] == ["scan"]
    scan = result["checks"]["scan"]
    assert scan["ok"] is False and scan["status"] == "failed"
    assert scan["error"] == "RuntimeError: scan kernel exploded"
    assert "scan kernel exploded" in scan["traceback"]
    for name in ("pretrain_demo", "pretrain_tcga", "finetune_demo"):
        assert result["checks"][name]["ok"] is True, name
    assert set(seen_on_disk) == {"scan", "pretrain_demo", "pretrain_tcga"}


def test_missing_monai_marks_finetune_unavailable_without_crashing(tmp_path: Path, monkeypatch,
                                                                   one_thread):
    monkeypatch.setitem(sys.modules, "monai", None)  # `import monai` raises ImportError
    out = tmp_path / "gpu-check.json"
    code = gpu_check.main(["--out", str(out), "--small", "--device", "cpu",
                           "--checks", "finetune_demo"])
    result = _strict_json(out)
    assert code == 1
    assert result["monai_available"] is False and result["unavailable"] == ["finetune_demo"]
    finetune = result["checks"]["finetune_demo"]
    assert finetune["ok"] is False and finetune["status"] == "unavailable"
    assert "monai is not installed" in finetune["error"]


def test_cuda_requested_without_a_gpu_exits_non_zero_saying_so(tmp_path: Path, monkeypatch,
                                                               capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu-check.json"
    code = gpu_check.main(["--out", str(out), "--device", "cuda"])
    assert code == 2
    assert "sees no GPU" in capsys.readouterr().err
    result = _strict_json(out)
    assert result["ok"] is False and "--device cpu --small" in result["error"]


def test_unknown_check_name_is_refused(tmp_path: Path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "x.json"), "--checks", "scan,nope"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "x.json").exists()


def _settings(*configs: str) -> Config:
    """The workflow config of the given files (later ones override), typed, schema defaults."""
    settings: dict = {}
    for name in configs:
        settings |= yaml.safe_load((REPO / name).read_text())
    return build(Config, settings)


def test_demo_sizes_are_those_of_config_yaml():
    from mgi.train.build import gene_config, image_config

    settings = _settings("config.yaml")
    seq_len = settings.expression.seq_len
    assert gene_config(settings.model, settings.expression, vocab_size=gpu_check.DEMO_VOCAB,
                       seq_len=seq_len) == gpu_check.demo_gene_config()
    in_chans = len(settings.imaging.mri.sequences)
    assert (image_config(settings.model, settings.imaging, in_chans=in_chans)
            == gpu_check.demo_image_config())
    assert seq_len - 1 + 3 == gpu_check.DEMO_VOCAB  # CLS + genes
    cases = gpu_check.pretrain_cases(small=False)
    demo, finetune = cases["pretrain_demo"], gpu_check.finetune_case(small=False)
    assert demo.batch_size == settings.pretrain.batch_size
    assert (demo.lr, demo.weight_decay) == (settings.pretrain.lr, settings.pretrain.weight_decay)
    assert finetune.batch_size == settings.finetune.batch_size
    assert (finetune.lr, finetune.weight_decay) == (settings.finetune.lr,
                                                    settings.finetune.weight_decay)


def test_tcga_sizes_are_those_of_the_tcga_lgg_cohort_at_224_px():
    from mgi.train.build import gene_config, image_config

    settings = _settings("cohorts/tcga-lgg.yaml")
    assert (gene_config(settings.model, settings.expression, vocab_size=gpu_check.TCGA_VOCAB,
                        seq_len=settings.expression.seq_len)
            == gpu_check.tcga_gene_config())
    cohort_image = image_config(settings.model, settings.imaging,
                                in_chans=len(settings.imaging.mri.sequences))
    # timm's ViT-B/16 shape (224 px) rather than the cohort's 256 px slices
    assert dataclasses.replace(cohort_image, img_size=224) == gpu_check.tcga_image_config()
    tcga = gpu_check.pretrain_cases(small=False)["pretrain_tcga"]
    assert tcga.batch_size == settings.pretrain.batch_size == 128
    assert (tcga.lr, tcga.weight_decay) == (settings.pretrain.lr, settings.pretrain.weight_decay)


def test_small_mode_shrinks_every_size():
    full, small = gpu_check.scan_size(small=False), gpu_check.scan_size(small=True)
    assert full.length == 16_384 and small.length < full.length
    for name in ("pretrain_demo", "pretrain_tcga"):
        big, tiny = (gpu_check.pretrain_cases(small=s)[name] for s in (False, True))
        assert tiny.batch_size < big.batch_size
        assert tiny.gene.seq_len < big.gene.seq_len and tiny.gene.d_model < big.gene.d_model
        assert tiny.image.img_size < big.image.img_size


def test_out_of_memory_in_the_default_backend_fails_the_check_but_the_next_still_runs(
        monkeypatch, one_thread):
    real_attempt = gpu_check._pretrain_attempt

    def attempt(case, backend, device):
        if backend == "sequential":  # what "auto" resolves to on a CPU
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_attempt(case, backend, device)

    monkeypatch.setattr(gpu_check, "_pretrain_attempt", attempt)
    case = gpu_check.pretrain_cases(small=True)["pretrain_tcga"]
    result = gpu_check.check_pretrain(case, device=torch.device("cpu"))
    first, second = result["attempts"]
    assert first["scan_backend"] == "sequential" and first["out_of_memory"] is True
    assert first["ok"] is False and "out of memory" in first["error"]
    assert second["scan_backend"] == "chunked" and second["ok"] is True
    assert result["ok"] is False and result["ok_backends"] == ["chunked"]
    assert result["steps_per_s"] is None and result["model"]["parameters"] > 0
