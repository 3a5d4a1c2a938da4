"""NIfTI cases (BraTS style): one volume per sequence and an optional label map, in a folder.

Volumes are read with SimpleITK (which keeps world coordinates in DICOM's LPS frame) and turned
to LPS (`DICOMOrient`), so that array[z] is an axial slice as a DICOM viewer shows it: rows
from anterior to posterior, columns from the patient's right to left, z from foot to head.
Every other sequence, and the label map, is put on the reference sequence's grid through the
images' geometry: as it is where the grids agree (BraTS volumes are co-registered on one grid),
else resampled (linear for images, nearest neighbour for the label map).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from mgi.errors import SeriesError
from mgi.imaging.mri.build import CaseVolumes
from mgi.imaging.mri.masks import NIFTI_MAX_OUTSIDE, NIFTI_SUFFIXES
from mgi.options import MriOptions

log = logging.getLogger(__name__)

SPACING_ATOL_MM = 1e-4
ORIGIN_ATOL_MM = 0.01
DIRECTION_ATOL = 1e-4


def nifti_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The NIfTI files (.nii, .nii.gz) directly in `folder`, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesError(f"{folder}: NIfTI case folder not found")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(NIFTI_SUFFIXES))


def role_files(
    files: Iterable[Path], *, options: MriOptions, exclude: Iterable[Path] = ()
) -> dict[str, Path]:
    """Role -> the one file whose name its `nifti` pattern matches (case-insensitive search).

    The roles are the configured sequences and the reference; a role without a pattern, or
    whose pattern matches no file, is absent. A pattern matching several files is an error
    naming them. Files in `exclude` (the label map) are no candidates.
    """
    skip = {Path(p) for p in exclude}
    candidates = [Path(p) for p in files if Path(p) not in skip]
    found: dict[str, Path] = {}
    for role in dict.fromkeys((*options.sequences, options.reference)):
        pattern = options.roles[role].nifti
        if pattern is None:
            continue
        matches = [p for p in candidates if re.search(pattern, p.name, re.IGNORECASE)]
        if len(matches) > 1:
            folder = matches[0].parent
            raise SeriesError(f"{folder}: {len(matches)} NIfTI files match the {role!r} pattern "
                              f"{pattern!r} (imaging.mri.roles.{role}.nifti): "
                              f"{[p.name for p in matches]}; expected one")
        if matches:
            found[role] = matches[0]
    return found


def _sitk_reason(err: RuntimeError) -> str:
    text = str(err)
    return text.split("sitk::ERROR:", 1)[-1].strip() if "sitk::ERROR:" in text else text


def read_volume(path: str | os.PathLike[str], *, what: str = "NIfTI volume") -> sitk.Image:
    """One 3-D scalar NIfTI image turned to LPS; SeriesError naming the file otherwise."""
    path = Path(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise SeriesError(f"{path}: unreadable {what} ({_sitk_reason(err)})") from err
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesError(f"{path}: {what} with {image.GetNumberOfComponentsPerPixel()} "
                          "components per voxel, expected one (a scalar volume)")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise SeriesError(f"{path}: {image.GetDimension()}-D {what} of size "
                          f"{list(image.GetSize())}, expected one 3-D volume")
    try:
        return sitk.DICOMOrient(image, "LPS")
    except RuntimeError as err:
        raise SeriesError(f"{path}: {what} cannot be turned to LPS ({_sitk_reason(err)})") \
            from err


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share size, spacing, origin and direction (within tolerances)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=SPACING_ATOL_MM)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=ORIGIN_ATOL_MM)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=DIRECTION_ATOL))


def _grid_text(image: sitk.Image) -> str:
    spacing = [round(v, 3) for v in image.GetSpacing()]
    origin = [round(v, 2) for v in image.GetOrigin()]
    return f"grid {list(image.GetSize())} of {spacing} mm voxels at {origin}"


def _coverage(image: sitk.Image, reference: sitk.Image) -> float:
    """Share of the reference grid's voxels that lie inside `image`'s volume."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    inside = sitk.Resample(ones, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return float(sitk.GetArrayViewFromImage(inside).mean())


def _on_grid(
    image: sitk.Image, reference: sitk.Image, *, interpolator: int
) -> tuple[np.ndarray, float, str]:
    """(array on the reference grid, coverage, how): as read where the grids agree."""
    if same_grid(image, reference):
        return sitk.GetArrayFromImage(image), 1.0, "same grid"
    resampled = sitk.Resample(image, reference, sitk.Transform(), interpolator, 0.0,
                              image.GetPixelID())
    return sitk.GetArrayFromImage(resampled), _coverage(image, reference), "resampled"


def _labels(path: Path, reference: sitk.Image, role: str) -> np.ndarray:
    """(Z, H, W) uint8 0/1 of a label map (label > 0) on the reference grid."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise SeriesError(f"{path}: not a NIfTI label map (.nii, .nii.gz); a NIfTI case takes "
                          "its tumour labels from one")
    labels = read_volume(path, what="NIfTI label map")
    binary = sitk.Cast(labels > 0, sitk.sitkUInt8)
    array, coverage, how = _on_grid(binary, reference, interpolator=sitk.sitkNearestNeighbor)
    if coverage < 1 - NIFTI_MAX_OUTSIDE:
        raise SeriesError(f"{path}: label map {_grid_text(labels)} covers {100 * coverage:.0f}% "
                          f"of the {role} volume ({_grid_text(reference)}); expected a label "
                          "map on the volumes' grid")
    if how == "resampled":
        log.warning("%s: label map %s is not on the %s grid (%s); resampled by nearest "
                    "neighbour", path, _grid_text(labels), role, _grid_text(reference))
    return array.astype(np.uint8)


def load_nifti_case(
    folder: str | os.PathLike[str], *, mask_path: str | os.PathLike[str] | None,
    options: MriOptions,
) -> CaseVolumes:
    """The case's volumes (one NIfTI file per role) and label map on the reference's grid."""
    folder = Path(folder)
    mask = Path(mask_path) if mask_path is not None else None
    files = nifti_files(folder)
    found = role_files(files, options=options, exclude=[mask] if mask else [])
    if not found:
        patterns = {r: options.roles[r].nifti for r in options.sequences}
        raise SeriesError(f"{folder}: no NIfTI volume of the sequences {list(options.sequences)} "
                          f"(file names matching {patterns}); found {[p.name for p in files]}")
    images = {role: read_volume(path) for role, path in found.items()}
    reference = options.reference if options.reference in images else next(iter(images))
    ref = images[reference]
    channels: dict[str, np.ndarray] = {}
    coverage: dict[str, float] = {}
    alignment: dict[str, str] = {}
    for role, image in images.items():
        if role == reference:
            array, cover, how = sitk.GetArrayFromImage(image), 1.0, "reference"
        else:
            array, cover, how = _on_grid(sitk.Cast(image, sitk.sitkFloat32), ref,
                                         interpolator=sitk.sitkLinear)
        coverage[role], alignment[role] = round(cover, 4), how
        if cover < options.min_coverage:
            log.warning("%s: %s covers %.0f%% of the %s volume (< imaging.mri.min_coverage "
                        "%.0f%%); counted as missing", found[role], role, 100 * cover, reference,
                        100 * options.min_coverage)
            continue
        channels[role] = array.astype(np.float32, copy=False)
    direction = np.asarray(ref.GetDirection(), dtype=np.float64).reshape(3, 3)
    rows, cols = direction[:, 0], direction[:, 1]  # directions of a row (x) and a column (y)
    normal = np.cross(rows, cols)
    depth = ref.GetSize()[2]
    x_mm, y_mm, z_mm = ref.GetSpacing()
    positions = (np.asarray(ref.GetOrigin())
                 + np.arange(depth)[:, np.newaxis] * z_mm * direction[:, 2])
    return CaseVolumes(
        channels=channels, reference=reference, z=positions @ normal,
        instance_numbers=np.arange(1, depth + 1, dtype=np.int64),
        pixel_spacing=(float(y_mm), float(x_mm)), slice_gap=float(z_mm),
        orientation=np.concatenate([rows, cols]),
        masks=_labels(mask, ref, reference) if mask is not None else None,
        mask_source="nifti" if mask is not None else "none",
        attrs={"source_layout": "nifti",
               "nifti_files": json.dumps({r: p.name for r, p in found.items()}),
               "nifti_labels": mask.name if mask is not None else "",
               "alignment": json.dumps(alignment)},
        qc={"coverage": json.dumps(coverage)},
    )
