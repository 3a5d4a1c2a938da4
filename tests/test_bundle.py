"""mgi export / load_bundle: one zip of checkpoint, encoding, settings and versions, verified."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from mgi.bundle import BUNDLE_VERSION, load_bundle
from mgi.checkpoint import save_failed
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
    """A cohort's results folder with a fine-tuned mgi variant and the fitted encoding."""
    root = tmp_path_factory.mktemp("results")
    tiny = write_tiny_cohort(root / "tiny")
    untrained("mgi", small(tiny.settings), root / "finetune" / "mgi" / "model.pt")
    save_failed(root / "finetune" / "vit_scratch" / "model.pt", variant="vit_scratch",
                error="out of memory")
    adata = make_adata(synthetic_counts(12, 40, seed=1))
    import pandas as pd
    splits = pd.DataFrame({"case_id": adata.obs_names, "split": ["train"] * 8 + ["test"] * 4})
    seqs = build_sequences(adata, splits, config=ExpressionOptions(seq_len=8, n_bins=11))
    seqs.encoding.save(root / "expression" / "encoding.npz")
    return root


def export(results: Path, out: Path, variant: str = "mgi") -> int:
    return main(["export", "--variant", variant, "--results", str(results), "--out", str(out),
                 "--settings", '{"evaluate": {"threshold": 0.4}}'])


def test_bundle_holds_checkpoint_encoding_settings_versions_and_reads_back(results, tmp_path):
    assert export(results, tmp_path / "a.mgi") == 0
    assert export(results, tmp_path / "b.mgi") == 0
    assert (tmp_path / "a.mgi").read_bytes() == (tmp_path / "b.mgi").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.mgi") as archive:
        assert sorted(archive.namelist()) == ["config.json", "encoding.npz", "manifest.json",
                                              "model.pt"]
        assert archive.read("model.pt") == (results / "finetune/mgi/model.pt").read_bytes()
        manifest = json.loads(archive.read("manifest.json"))
    assert manifest["format_version"] == BUNDLE_VERSION and manifest["modality"] == "mri"
    assert set(manifest["versions"]) == {"mgi", "torch", "monai", "timm", "pydicom", "SimpleITK"}
    assert set(manifest["members"]) == {"config.json", "encoding.npz", "model.pt"}
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
    with pytest.raises(BundleError, match=r"new\.mgi: bundle format version 2; this mgi reads"):
        load_bundle(tmp_path / "new.mgi")
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
