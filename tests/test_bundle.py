"""mgi export / load_bundle / mgi unbundle: one zip of checkpoint, encoding, settings, versions
and (for variants that start from pre-training) the pre-training checkpoint, verified."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from mgi.bundle import BUNDLE_VERSION, load_bundle
from mgi.checkpoint import save_failed, save_pretrained
from mgi.cli import main
from mgi.errors import BundleError
from mgi.expression.encoding import SequenceEncoding
from mgi.expression.tokens import build_sequences
from mgi.options import ExpressionOptions
from tests.evaluate.test_segmentation import small, untrained
from tests.expression.conftest import synthetic_counts
from tests.expression.test_tokens import make_adata
from tests.train.conftest import write_tiny_cohort


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A cohort's results folder with fine-tuned variants mgi (from pre-training) and
    unet_scratch, the pre-training checkpoint and the fitted encoding."""
    root = tmp_path_factory.mktemp("results")
    tiny = write_tiny_cohort(root / "tiny")
    untrained("mgi", small(tiny.settings), root / "finetune" / "mgi" / "model.pt")
    untrained("unet_scratch", small(tiny.settings),
              root / "finetune" / "unet_scratch" / "model.pt")
    import torch
    save_pretrained(root / "pretrain" / "model.pt", state_dict={"w": torch.arange(6.0)},
                    gene_config={"kind": "mamba"}, image_config={"depth": 2}, best_epoch=3)
    save_failed(root / "finetune" / "vit_scratch" / "model.pt", variant="vit_scratch",
                error="out of memory")
    adata = make_adata(synthetic_counts(12, 40, seed=1))
    import pandas as pd
    splits = pd.DataFrame({"case_id": adata.obs_names, "split": ["train"] * 8 + ["test"] * 4})
    seqs = build_sequences(adata, splits, config=ExpressionOptions(seq_len=8, n_bins=11))
    seqs.encoding.save(root / "expression" / "encoding.npz")
    return root


def export(results: Path, out: Path, variant: str = "mgi", *extra: str) -> int:
    return main(["export", "--variant", variant, "--results", str(results), "--out", str(out),
                 "--threshold", "0.4", *extra])


def test_bundle_holds_checkpoint_encoding_settings_versions_and_reads_back(results, tmp_path):
    assert export(results, tmp_path / "a.mgi") == 0
    assert export(results, tmp_path / "b.mgi") == 0
    assert (tmp_path / "a.mgi").read_bytes() == (tmp_path / "b.mgi").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.mgi") as archive:
        assert sorted(archive.namelist()) == ["config.json", "encoding.npz", "manifest.json",
                                              "model.pt", "pretrain.pt"]
        assert archive.read("model.pt") == (results / "finetune/mgi/model.pt").read_bytes()
        assert archive.read("pretrain.pt") == (results / "pretrain/model.pt").read_bytes()
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["format_version"] == BUNDLE_VERSION and manifest["modality"] == "mri"
    assert set(manifest["versions"]) == {"mgi", "torch", "monai", "timm", "pydicom", "SimpleITK"}
    assert set(manifest["members"]) == {"config.json", "encoding.npz", "model.pt", "pretrain.pt"}
    bundle = load_bundle(tmp_path / "a.mgi")
    assert bundle.variant == "mgi" and bundle.threshold == 0.4 and bundle.modality == "mri"
    assert bundle.settings.imaging.mri.image_px == 16 and bundle.stain_reference is None
    expected = SequenceEncoding.load(results / "expression" / "encoding.npz")
    assert bundle.encoding.gene_ids.tolist() == expected.gene_ids.tolist()


def _rewrite(src: Path, dst: Path, change) -> None:
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    change(members)
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def test_corrupted_member_or_other_format_version_is_refused(results, tmp_path):
    assert export(results, tmp_path / "a.mgi") == 0

    def tamper(members):
        members["config.json"] = members["config.json"].replace(b"0.4", b"0.9")

    def future(members):
        manifest = json.loads(members["manifest.json"])
        manifest["format_version"] = BUNDLE_VERSION + 1
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(tmp_path / "a.mgi", tmp_path / "bad.mgi", tamper)
    with pytest.raises(BundleError, match=r"bad\.mgi: member config\.json is corrupted"):
        load_bundle(tmp_path / "bad.mgi")
    _rewrite(tmp_path / "a.mgi", tmp_path / "new.mgi", future)
    with pytest.raises(BundleError, match=rf"new\.mgi: bundle format version {BUNDLE_VERSION + 1}; "
                       rf"this mgi reads version {BUNDLE_VERSION}: export the model again"):
        load_bundle(tmp_path / "new.mgi")

    def old(members):  # a version 1 bundle: no pretrain.pt
        manifest = json.loads(members["manifest.json"])
        manifest["format_version"] = 1
        del manifest["members"]["pretrain.pt"], members["pretrain.pt"]
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(tmp_path / "a.mgi", tmp_path / "old.mgi", old)
    with pytest.raises(BundleError, match=r"old\.mgi: bundle format version 1; this mgi reads"):
        load_bundle(tmp_path / "old.mgi")
    assert main(["unbundle", "--bundle", str(tmp_path / "old.mgi"), "--pretrain",
                 str(tmp_path / "p.pt"), "--encoding", str(tmp_path / "e.npz")]) == 1
    assert not (tmp_path / "p.pt").exists() and not (tmp_path / "e.npz").exists()
    (tmp_path / "junk.mgi").write_bytes(b"not a zip")
    with pytest.raises(BundleError, match=r"junk\.mgi: not an mgi bundle"):
        load_bundle(tmp_path / "junk.mgi")


def test_export_refuses_a_failed_variant_or_missing_encoding(results, tmp_path, capsys):
    assert export(results, tmp_path / "v.mgi", variant="vit_scratch") == 1
    assert "did not train (out of memory)" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "finetune" / "mgi").mkdir(parents=True)
    (empty / "finetune" / "mgi" / "model.pt").write_bytes(
        (results / "finetune" / "mgi" / "model.pt").read_bytes())
    assert export(empty, tmp_path / "e.mgi") == 1
    assert "encoding.npz: not found" in capsys.readouterr().err
    assert not (tmp_path / "v.mgi").exists() and not (tmp_path / "e.mgi").exists()


def unbundle(bundle: Path, out: Path) -> int:
    return main(["unbundle", "--bundle", str(bundle), "--pretrain", str(out / "model.pt"),
                 "--encoding", str(out / "encoding.npz")])


def test_unbundle_writes_the_pretraining_and_encoding_byte_identical(results, tmp_path):
    other = tmp_path / "pre.pt"
    other.write_bytes((results / "pretrain" / "model.pt").read_bytes())
    assert export(results, tmp_path / "a.mgi", "mgi", "--pretrain", str(other)) == 0
    out = tmp_path / "second" / "pretrained"
    assert unbundle(tmp_path / "a.mgi", out) == 0
    assert (out / "model.pt").read_bytes() == other.read_bytes()
    assert (out / "encoding.npz").read_bytes() == (
        results / "expression" / "encoding.npz").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["encoding.npz", "model.pt"]  # no leftovers


def test_a_scratch_bundle_has_no_pretraining_and_is_refused_by_unbundle(results, tmp_path,
                                                                         capsys):
    assert export(results, tmp_path / "s.mgi", "unet_scratch") == 0
    with zipfile.ZipFile(tmp_path / "s.mgi") as archive:
        assert "pretrain.pt" not in archive.namelist()
    assert load_bundle(tmp_path / "s.mgi").pretrain is None
    assert unbundle(tmp_path / "s.mgi", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "s.mgi: variant unet_scratch starts from scratch" in err and "no pretrain.pt" in err
    assert not (tmp_path / "out" / "model.pt").exists()
    assert not (tmp_path / "out" / "encoding.npz").exists()
    assert export(results, tmp_path / "x.mgi", "unet_scratch", "--pretrain",
                  str(results / "pretrain" / "model.pt")) == 1
    assert "starts from scratch; it has no pre-training to bundle" in capsys.readouterr().err


def test_export_of_a_pretrained_variant_needs_its_pretraining(results, tmp_path, capsys):
    assert export(results, tmp_path / "a.mgi", "mgi", "--pretrain",
                  str(tmp_path / "absent.pt")) == 1
    assert "absent.pt: not found; expected the pre-training checkpoint variant mgi" in (
        capsys.readouterr().err)
    assert not (tmp_path / "a.mgi").exists()
