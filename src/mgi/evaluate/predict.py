"""`mgi predict`: a bundled model (mgi export) applied to new patients of a sample sheet.

Each patient's image is banked exactly as training banked it (an MR study by build_mri_bank, a
slide by tile_slide with the bundle's stain reference and seed, both with the bundle's imaging
options), its expression profile encoded with the bundle's encoding, and the network run by
evaluate's own code (`predict_items`, `write_patient_masks`). Written under `out_dir`: `masks/`
as evaluate writes them (`{case_id}.nii.gz` per MR patient, `{case_id}/{case_id}_x{x}_y{y}.png`
per slide tile), `volumes.tsv` (MR: voxels and mL; slides: tiles and tumour area in mm²),
`overlays/{case_id}.png`, `qc.tsv` (the banks' QC rows) and `banks/` (the banks, slide
thumbnails and the encoded sequences). A patient whose files are missing or fail to bank is a
`failed` row of volumes.tsv; the others go on.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from mgi.acquire import folder
from mgi.acquire.local import read_sample_sheet
from mgi.bundle import Bundle, load_bundle
from mgi.errors import BundleError, MgiError
from mgi.evaluate.segmentation import predict_items, voxel_spacing, write_patient_masks
from mgi.expression.anndata_build import COUNTS_COLUMN, VALUE_LAYERS
from mgi.expression.star import read_star_counts
from mgi.expression.tokens import GeneSequences, write_sequences
from mgi.imaging.bank import read_bank_header
from mgi.imaging.mri import build_mri_bank
from mgi.imaging.mri.build import layout_of
from mgi.imaging.slides import tile_slide
from mgi.imaging.stain import Normaliser, normaliser_from_dict
from mgi.io import atomic_path, write_tsv
from mgi.options import TciaOptions
from mgi.train.build import seed_everything
from mgi.train.data import load_cohort

log = logging.getLogger(__name__)

VOLUME_COLUMNS = ["case_id", "tumour_voxels", "tumour_volume_ml", "status", "reason"]
AREA_COLUMNS = ["case_id", "tiles", "tumour_area_mm2", "status", "reason"]
LAYERS = {"counts": COUNTS_COLUMN, "tpm": VALUE_LAYERS["tpm"],
          "fpkm_uq": VALUE_LAYERS["fpkm_uq"]}


def predict_patients(*, bundle_path: Path, samples_path: Path, out_dir: Path,
                     threads: int = 1) -> pd.DataFrame:
    """Masks, volumes, overlays and QC of every patient of the sheet; volumes.tsv comes back."""
    bundle = load_bundle(bundle_path)
    if bundle.modality not in ("mri", "wsi"):
        raise MgiError(f"{bundle_path}: a {bundle.modality!r} model; expected mri or wsi")
    columns = VOLUME_COLUMNS if bundle.modality == "mri" else AREA_COLUMNS
    normaliser = _normaliser(bundle) if bundle.modality == "wsi" else None
    sheet_path = Path(samples_path).resolve()
    sheet = read_sample_sheet(sheet_path)
    banks = Path(out_dir) / "banks"
    for folder_path in (banks, Path(out_dir) / "masks", Path(out_dir) / "overlays"):
        folder_path.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    qc_rows, profiles = [], {}
    for record in sheet.to_dict("records"):
        case = record["case_id"]
        try:
            profile = read_profile(_resolve(sheet_path, record["expression"]), case_id=case)
            image = _resolve(sheet_path, record["image"])
            if bundle.modality == "mri":
                qc = _bank(image, case_id=case, bundle=bundle, bank_path=banks / f"{case}.h5",
                           raw_dir=banks)
            else:
                qc = _tile(image, case_id=case, bundle=bundle, bank_path=banks / f"{case}.h5",
                           normaliser=normaliser, threads=threads)
        except (MgiError, OSError, ValueError) as err:
            failed[case] = " ".join(str(err).split())
            log.warning("patient %s skipped: %s", case, failed[case])
            continue
        qc_rows.append(qc)
        if qc["status"] != "ok":
            failed[case] = str(qc.get("reason", "banking failed"))
        else:
            profiles[case] = profile
    qc_table = pd.DataFrame(qc_rows)
    write_tsv(qc_table, Path(out_dir) / "qc.tsv")
    volumes = {}
    if profiles:
        volumes = _predict(bundle, profiles, qc_table[qc_table["status"] == "ok"], banks=banks,
                           out_dir=Path(out_dir), threads=threads)
    rows = []
    for case in sheet["case_id"]:
        if case in volumes:
            rows.append({"case_id": case, **volumes[case], "status": "ok", "reason": ""})
        else:
            rows.append({"case_id": case, "status": "failed",
                         "reason": failed.get(case, "no slice or tile banked")})
    table = pd.DataFrame(rows, columns=columns)
    table[columns[1]] = table[columns[1]].astype("Int64")
    write_tsv(table, Path(out_dir) / "volumes.tsv")
    log.info("%d patients: %d predicted, %d failed", len(table),
             int((table["status"] == "ok").sum()), int((table["status"] != "ok").sum()))
    return table


def read_profile(path: Path, *, case_id: str) -> ad.AnnData:
    """One patient's STAR counts file as a one-case AnnData (layers counts, tpm, fpkm_uq), as
    build_expression reads it."""
    star = read_star_counts(path, columns=tuple(LAYERS.values()))
    values = {name: star.values[column].astype(np.float32)[None, :]
              for name, column in LAYERS.items()}
    var = pd.DataFrame({"gene_name": star.genes["gene_name"].to_numpy(),
                        "gene_type": star.genes["gene_type"].to_numpy()},
                       index=star.genes["gene_id"].astype(str).to_numpy())
    adata = ad.AnnData(X=values["counts"].copy(), obs=pd.DataFrame(index=[case_id]), var=var,
                       layers=values)
    adata.uns["gene_model"] = star.gene_model
    return adata


def _resolve(sheet: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else sheet.parent / path


def _bank(study: Path, *, case_id: str, bundle: Bundle, bank_path: Path, raw_dir: Path) -> dict:
    """The patient's bank and QC row, by the bundle's imaging options (masks ignored)."""
    if not study.is_dir():
        raise MgiError(f"{study}: MR study folder not found (sample sheet column 'image')")
    options = bundle.settings.imaging.mri
    labels = folder.label_pattern(TciaOptions().nifti_labels,
                                  "sources.tcia.nifti_labels")
    row = folder.patient_row(case_id, study, layout=layout_of(study), labels=labels,
                             raw_dir=raw_dir, options=options, choices=[])
    # a DICOM study's row path is radiology/{case_id} under raw_dir (its series.tsv); the
    # other layouts' are absolute
    return build_mri_bank(image_id=case_id, case_id=case_id, series_root=raw_dir / row["path"],
                          mask_dir=None, out_path=bank_path, options=options)


def _normaliser(bundle: Bundle) -> Normaliser | None:
    """The slides' stain normaliser of the bundle (None when imaging.wsi.stain.method is none)."""
    method = bundle.settings.imaging.wsi.stain.method
    if method == "none":
        return None
    if bundle.stain_reference is None:
        raise BundleError(f"{bundle.path}: no stain_reference.json; imaging.wsi.stain.method is "
                          f"{method!r}, so the bundle needs the fitted reference")
    try:
        return normaliser_from_dict(bundle.stain_reference)
    except KeyError as err:
        raise BundleError(f"{bundle.path}: stain_reference.json lacks field {err}") from err


def _tile(slide: Path, *, case_id: str, bundle: Bundle, bank_path: Path,
          normaliser: Normaliser | None, threads: int) -> dict:
    """The patient's tile bank and QC row, tiled as training tiled (mgi.imaging.run)."""
    if not slide.is_file():
        raise MgiError(f"{slide}: slide file not found (sample sheet column 'image')")
    wsi = bundle.settings.imaging.wsi
    return tile_slide(image_id=case_id, case_id=case_id, slide_path=slide, mask_path=None,
                      out_path=bank_path, qc_png_path=bank_path.with_suffix(".png"),
                      tile_px=wsi.tile_px, mpp=wsi.mpp, mpp_fallback=wsi.mpp_fallback,
                      tissue_min=wsi.tissue_min, max_tiles=wsi.max_tiles,
                      seed=bundle.settings.seed, normaliser=normaliser, threads=threads)


def _predict(bundle: Bundle, profiles: dict[str, ad.AnnData], qc: pd.DataFrame, *,
             banks: Path, out_dir: Path, threads: int) -> dict[str, dict]:
    """Run the network on the banked patients; write masks and overlays; their volumes."""
    from mgi.evaluate.plots import overlay

    cases = sorted(profiles)
    encoded = [bundle.encoding.encode(profiles[case]) for case in cases]
    vocab = bundle.encoding.vocab
    seqs = GeneSequences(case_ids=np.array(cases), splits=np.array(["test"] * len(cases)),
                         token_ids=np.concatenate([e[0] for e in encoded]),
                         values=np.concatenate([e[1] for e in encoded]), vocab=vocab,
                         attrs={"vocab_size": len(vocab)})
    write_sequences(seqs, sequences_path=banks / "sequences.npz", vocab_path=banks / "vocab.tsv")
    write_tsv(pd.DataFrame({"case_id": cases, "split": "test"}), banks / "splits.tsv")
    write_tsv(qc, banks / "qc.tsv")
    seed_everything(0, threads=threads)
    data = load_cohort(sequences_path=banks / "sequences.npz", splits_path=banks / "splits.tsv",
                       qc_path=banks / "qc.tsv")
    items = data.items("test")
    pred = predict_items(bundle.checkpoint, data, items) >= bundle.threshold
    write_patient_masks(data, items, pred, out_dir=out_dir / "masks", variant=bundle.variant)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    volumes = {}
    for case in sorted(set(data.item_case[items])):
        sel = np.flatnonzero(data.item_case[items] == case)
        sel = sel[np.argsort(data.item_coord[items][sel], kind="stable")]
        header = read_bank_header(banks / f"{case}.h5")
        if bundle.modality == "wsi":
            # each tile covers (tile_px * mpp) µm square, whatever the network's resolution
            tile_mm2 = (float(header.attrs["tile_px"]) * float(header.attrs["mpp"]) / 1000) ** 2
            fraction = pred[sel].reshape(len(sel), -1).mean(axis=1)
            volumes[case] = {"tiles": len(sel),
                             "tumour_area_mm2": float(fraction.sum()) * tile_mm2}
        else:
            spacing = voxel_spacing(header.attrs)
            voxels = int(pred[sel].sum())
            volumes[case] = {"tumour_voxels": voxels,
                             "tumour_volume_ml": (voxels * math.prod(spacing) / 1000.0
                                                  if spacing else None)}
        best = sel[int(np.argmax(pred[sel].reshape(len(sel), -1).sum(1)))]
        image = data.images[np.array([items[best]])][0, 0]
        png = overlay(image, np.zeros_like(pred[best]), {bundle.variant: pred[best]},
                      title=f"{case}: {bundle.variant}")
        with atomic_path(out_dir / "overlays" / f"{case}.png", suffix=".png") as tmp:
            tmp.write_bytes(png)
    return volumes
