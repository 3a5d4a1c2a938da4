"""A model bundle (`mgi export`): one fine-tuned variant and everything that applies it to new
patients, in a single zip file (`results/{cohort}/export/{variant}.mgi`).

One file, not a folder: it is copied, mailed and checksummed as a whole, and a half-copied
bundle is caught by its manifest. Members:

- `model.pt`: the variant's checkpoint, as mgi.checkpoint wrote it (weights, the model /
  finetune / imaging / expression settings that rebuild it);
- `encoding.npz`: the fitted gene-sequence encoding (mgi.expression.encoding);
- `config.json`: variant, modality, the checkpoint's settings (imaging: how images are banked and
  normalised) and the evaluate threshold;
- `stain_reference.json`: the cohort's fitted stain normaliser, where it has one;
- `pretrain.pt`: for a variant that starts from pre-training (mgi.variants.pretraining_of), the
  pre-training checkpoint it was fine-tuned from, so that another cohort can fine-tune from the
  bundle (`mgi unbundle`, finetune.pretrained: a `.mgi` file);
- `manifest.json`: bundle format and version, package and library versions, and the SHA-256 of
  every other member. `load_bundle` verifies them and refuses another format version.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from mgi.checkpoint import Finetuned, load_finetuned, load_pretrained
from mgi.errors import BundleError, MgiError
from mgi.expression.encoding import SequenceEncoding
from mgi.io import atomic_path
from mgi.layout import results_path
from mgi.options import FinetuneSettings, as_dict
from mgi.variants import pretraining_of, variant_spec

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "mgi-bundle"
BUNDLE_VERSION = 2  # 2: pretrain.pt of the variants that start from pre-training
LIBRARIES = ("mgi", "torch", "monai", "timm", "pydicom", "SimpleITK")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed member dates: same inputs, same bytes


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    variant: str
    modality: str
    threshold: float
    checkpoint: Finetuned
    encoding: SequenceEncoding
    stain_reference: dict | None
    manifest: dict
    members: dict[str, bytes] = field(repr=False, default_factory=dict)  # verified bytes

    @property
    def pretrain(self) -> bytes | None:
        """The pre-training checkpoint the variant was fine-tuned from; None for scratch ones."""
        return self.members.get("pretrain.pt")

    @property
    def settings(self) -> FinetuneSettings:
        """The settings the variant was trained with (imaging included)."""
        assert self.checkpoint.settings is not None  # load_bundle refuses failed variants
        return self.checkpoint.settings


def library_versions() -> dict[str, str]:
    """Installed version of mgi and the libraries that shape its predictions."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def export_bundle(*, variant: str, results_dir: Path, out_path: Path, threshold: float,
                  pretrain_path: Path | None = None) -> Path:
    """Write the bundle of fine-tuned `variant` of the cohort at `results_dir` to `out_path`.

    A variant that starts from pre-training also carries that checkpoint: `pretrain_path`, by
    default the cohort's own (pretrain/model.pt, or the ablation's pretrain/ablation/{kind}/).
    """
    model_path = results_path(results_dir, "finetune_model", variant=variant)
    encoding_path = results_path(results_dir, "encoding")
    stain_path = results_path(results_dir, "stain_reference")
    for path, what in ((model_path, "the fine-tuned checkpoint"),
                       (encoding_path, "the fitted encoding (mgi sequences --encoding)")):
        if not path.is_file():
            raise BundleError(f"{path}: not found; expected {what} of variant {variant}")
    checkpoint = load_finetuned(model_path)
    if checkpoint.failed:
        raise BundleError(f"{model_path}: variant {variant} did not train "
                          f"({checkpoint.error}); nothing to export")
    if checkpoint.variant != variant:
        raise BundleError(f"{model_path}: holds variant {checkpoint.variant!r}; expected "
                          f"{variant!r}")
    settings = checkpoint.settings
    assert settings is not None
    if variant_spec(variant).pretrained:
        if pretrain_path is None:
            folder = pretraining_of(variant, configured_kind=settings.model.gene_encoder.kind)
            pretrain_path = Path(results_dir) / str(folder) / "model.pt"
        if not Path(pretrain_path).is_file():
            raise BundleError(f"{pretrain_path}: not found; expected the pre-training "
                              f"checkpoint variant {variant} was fine-tuned from")
        load_pretrained(Path(pretrain_path))  # refuse a bad checkpoint now
    elif pretrain_path is not None:
        raise BundleError(f"{pretrain_path}: variant {variant} starts from scratch; it has no "
                          "pre-training to bundle")
    SequenceEncoding.load(encoding_path)  # refuse a bad encoding now, not at prediction
    imaging = settings.imaging
    needs_stain = imaging.modality == "wsi" and imaging.wsi.stain.method != "none"
    if needs_stain and not stain_path.is_file():
        raise BundleError(f"{stain_path}: not found; imaging.wsi.stain.method is "
                          f"{imaging.wsi.stain.method!r}, so the bundle needs the reference")
    config = {"variant": variant, "modality": imaging.modality, "settings": as_dict(settings),
              "evaluate": {"threshold": float(threshold)}}
    members = {
        "model.pt": model_path.read_bytes(),
        "encoding.npz": encoding_path.read_bytes(),
        "config.json": (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }
    if stain_path.is_file():
        members["stain_reference.json"] = stain_path.read_bytes()
    if pretrain_path is not None:
        members["pretrain.pt"] = Path(pretrain_path).read_bytes()
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "variant": variant,
        "modality": imaging.modality,
        "versions": library_versions(),
        "members": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    members["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    with atomic_path(out_path, suffix=".mgi") as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, members[name])
    log.info("bundle of %s (%s) -> %s", variant, imaging.modality, out_path)
    return Path(out_path)


def load_bundle(path: Path) -> Bundle:
    """Read and verify a bundle: BundleError naming the file and the member that is wrong."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "manifest.json" not in names:
                raise BundleError(f"{path}: no manifest.json; expected an mgi bundle "
                                  "(mgi export)")
            manifest = json.loads(archive.read("manifest.json"))
            _check_format(path, manifest)
            listed = manifest.get("members", {})
            unlisted = sorted(names - set(listed) - {"manifest.json"})
            absent = sorted(set(listed) - names)
            if unlisted or absent:
                raise BundleError(f"{path}: members {absent} missing, {unlisted} not in the "
                                  "manifest; expected exactly the manifest's members")
            members = {}
            for name, digest in listed.items():
                try:
                    data = archive.read(name)
                except (zipfile.BadZipFile, OSError) as err:
                    raise BundleError(f"{path}: member {name} is corrupted ({err})") from err
                if hashlib.sha256(data).hexdigest() != digest:
                    raise BundleError(f"{path}: member {name} is corrupted (SHA-256 differs "
                                      "from the manifest's)")
                members[name] = data
    except FileNotFoundError as err:
        raise BundleError(f"{path}: bundle not found") from err
    except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not an mgi bundle ({err})") from err
    for name in ("model.pt", "encoding.npz", "config.json"):
        if name not in members:
            raise BundleError(f"{path}: no member {name}; expected one in every bundle")
    config = json.loads(members["config.json"])
    try:
        checkpoint = load_finetuned(path / "model.pt", data=members["model.pt"])
        encoding = SequenceEncoding.load(io.BytesIO(members["encoding.npz"]))
    except MgiError as err:
        raise BundleError(f"{path}: {err}") from err
    if checkpoint.failed:
        raise BundleError(f"{path}: the bundled variant did not train ({checkpoint.error})")
    stain = members.get("stain_reference.json")
    return Bundle(path=path, variant=config["variant"], modality=config["modality"],
                  threshold=float(config["evaluate"]["threshold"]), checkpoint=checkpoint,
                  encoding=encoding, stain_reference=json.loads(stain) if stain else None,
                  manifest=manifest, members=members)


def unbundle(*, bundle_path: Path, pretrain_out: Path, encoding_out: Path) -> Bundle:
    """Verify a bundle and write its pre-training checkpoint and encoding (each atomically):
    what another cohort fine-tunes from (finetune.pretrained: a `.mgi` file)."""
    bundle = load_bundle(bundle_path)
    if bundle.pretrain is None:
        raise BundleError(f"{bundle.path}: variant {bundle.variant} starts from scratch; the "
                          "bundle holds no pretrain.pt to fine-tune from (export a variant that "
                          "starts from pre-training, e.g. mgi)")
    try:
        load_pretrained(Path(bundle.path) / "pretrain.pt", data=bundle.pretrain)
    except MgiError as err:
        raise BundleError(f"{bundle.path}: {err}") from err
    for out, data in ((pretrain_out, bundle.pretrain), (encoding_out,
                                                        bundle.members["encoding.npz"])):
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
    log.info("pre-training of %s from %s -> %s, %s", bundle.variant, bundle.path, pretrain_out,
             encoding_out)
    return bundle


def _check_format(path: Path, manifest: dict) -> None:
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: manifest format {manifest.get('format')!r}; expected "
                          f"{BUNDLE_FORMAT!r}")
    version = manifest.get("format_version")
    if version != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle format version {version!r}; this mgi reads version "
                          f"{BUNDLE_VERSION}: export the model again with this release")
