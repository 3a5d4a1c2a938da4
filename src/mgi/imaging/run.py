"""One image of the image table to its bank and QC row, by modality (what `mgi image` runs)."""

from __future__ import annotations

import logging
from pathlib import Path

from mgi.errors import BankError
from mgi.io import read_tsv
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import ImagingSettings

log = logging.getLogger(__name__)


def image_table_row(images_table: Path, image_id: str) -> dict[str, str]:
    """The row of `image_id` in the image table (images.tsv)."""
    table = read_tsv(images_table, required=IMAGE_TABLE_COLUMNS)
    rows = table[table["image_id"] == image_id]
    if len(rows) != 1:
        raise BankError(f"{images_table}: expected one row with image_id {image_id!r}, "
                        f"found {len(rows)}")
    return rows.iloc[0].to_dict()


def fit_stain_reference(
    *, images_table: Path, raw_dir: Path, settings: ImagingSettings, out_path: Path
) -> None:
    """Fit the cohort's stain reference (imaging.wsi.stain) from the slides of the image table."""
    from mgi.imaging.reference import fit_reference

    wsi = settings.imaging.wsi
    stain = wsi.stain
    table = read_tsv(images_table, required=IMAGE_TABLE_COLUMNS)
    slides = [raw_dir / p for p in table.loc[table["modality"] == "wsi", "path"]]
    fit_reference(
        method=stain.method, out_path=out_path,
        reference_tile=Path(stain.reference_tile) if stain.reference_tile else None,
        slide_paths=slides, tiles_per_slide=stain.tiles_per_slide, max_slides=stain.max_slides,
        tile_px=wsi.tile_px, mpp=wsi.mpp, mpp_fallback=wsi.mpp_fallback,
        tissue_min=wsi.tissue_min, seed=settings.seed,
    )


def process_image(
    *,
    images_table: Path,
    image_id: str,
    raw_dir: Path,
    settings: ImagingSettings,
    bank_path: Path,
    qc_path: Path,
    thumbnail_path: Path | None = None,
    stain_reference: Path | None = None,
    threads: int = 1,
) -> dict:
    """Write the bank and QC row of one image; a bad image gives a failed row, not an exception."""
    from mgi.imaging.qc import write_qc_row

    row = image_table_row(images_table, image_id)
    imaging = settings.imaging
    mask = raw_dir / row["mask_path"] if row["mask_path"] else None
    if row["modality"] != imaging.modality:
        raise BankError(f"{images_table}: image {image_id} is {row['modality']!r}, "
                        f"but imaging.modality is {imaging.modality!r}")
    if row["modality"] == "mri":
        from mgi.imaging.mri import build_mri_bank

        qc = build_mri_bank(
            image_id=image_id,
            case_id=row["case_id"],
            series_root=raw_dir / row["path"],
            mask_dir=mask,
            out_path=bank_path,
            options=imaging.mri,
        )
    else:
        from mgi.imaging.slides import tile_slide
        from mgi.imaging.stain import load_normaliser

        wsi = imaging.wsi
        if thumbnail_path is None:
            raise BankError(f"image {image_id}: a slide needs a QC thumbnail path (--thumbnail)")
        method = wsi.stain.method
        if method != "none" and stain_reference is None:
            raise BankError(f"image {image_id}: imaging.wsi.stain.method is {method!r}; the "
                            "fitted reference is needed (--stain-reference)")
        normaliser = load_normaliser(stain_reference) if method != "none" else None
        qc = tile_slide(
            image_id=image_id,
            case_id=row["case_id"],
            slide_path=raw_dir / row["path"],
            mask_path=mask,
            out_path=bank_path,
            qc_png_path=thumbnail_path,
            tile_px=wsi.tile_px,
            mpp=wsi.mpp,
            mpp_fallback=wsi.mpp_fallback,
            tissue_min=wsi.tissue_min,
            max_tiles=wsi.max_tiles,
            seed=settings.seed,
            normaliser=normaliser,
            threads=threads,
        )
    write_qc_row(qc, qc_path)
    return qc
