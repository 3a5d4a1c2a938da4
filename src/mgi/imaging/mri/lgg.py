"""The LGG segmentation set (Buda et al. 2019): 3-channel slice TIFFs with FLAIR masks.

Each case folder holds ``{case}_{n}.tif`` (RGB = pre-contrast T1, FLAIR, post-contrast T1, as
the set's authors stacked them) and ``{case}_{n}_mask.tif`` (0/255). The TIFFs carry no
geometry: slice positions, spacing and orientation are unknown, so the loader assumes slice
number = position (1 mm apart), 1 mm pixels and an axial identity orientation, and says so in
the bank's attrs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import tifffile

from mgi.errors import SeriesError
from mgi.imaging.mri.build import CaseVolumes
from mgi.imaging.mri.masks import (
    MASK_NAME,
    load_slice_masks,
    mask_files,
    mask_kind,
    numbered_files,
    read_mask_tiff,
)
from mgi.options import MriOptions

log = logging.getLogger(__name__)

_LGG_IMAGE_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)\.tiff?$", re.IGNORECASE)
ASSUMED_SLICE_GAP_MM = 1.0  # the set's TIFFs record no slice positions
ASSUMED_PIXEL_MM = (1.0, 1.0)  # nor pixel spacing
AXIAL_IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
NO_GEOMETRY = "none (LGG set TIFFs)"


def lgg_slice_files(folder: str | os.PathLike[str]) -> dict[int, Path]:
    """Map slice number -> image TIFF (``<case>_<n>.tif``, masks left out) of an LGG case folder."""
    return numbered_files(Path(folder), _LGG_IMAGE_NAME, what="LGG slice", skip=MASK_NAME)


def read_lgg_tif_images(folder: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Return (images (N, 3, H, W) uint8, slice numbers) of an LGG case, by slice number."""
    folder = Path(folder)
    images = lgg_slice_files(folder)
    if not images:
        raise SeriesError(f"{folder}: no LGG slice '<case>_<n>.tif' found")
    numbers = np.array(sorted(images), dtype=np.int64)
    pixels = []
    for number in numbers:
        path = images[int(number)]
        try:
            image = tifffile.imread(path)
        except (OSError, ValueError) as err:  # tifffile.TiffFileError is a ValueError
            raise SeriesError(f"{path}: unreadable TIFF ({err})") from err
        if image.size == 0:
            raise SeriesError(f"{path}: unreadable TIFF (no image in the file)")
        if image.ndim != 3 or image.shape[2] != 3:
            raise SeriesError(f"{path}: shape {image.shape}, expected (H, W, 3): the LGG set's "
                              "pre-contrast, FLAIR and post-contrast channels")
        if image.dtype != np.uint8:
            raise SeriesError(f"{path}: pixel type {image.dtype}, expected uint8")
        pixels.append(image)
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise SeriesError(f"{folder}: slices of different shapes {sorted(shapes)}")
    return np.stack(pixels).transpose(0, 3, 1, 2), numbers


def read_lgg_tif_slices(
    folder: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images (N, 3, H, W) uint8, masks (N, H, W) uint8 0/1, slice numbers) of an LGG case.

    Reads the LGG segmentation set layout (``{case}_{n}.tif`` RGB = pre-contrast, FLAIR,
    post-contrast; ``{case}_{n}_mask.tif`` 0/255), ordered by slice number, not file name.
    """
    folder = Path(folder)
    images, numbers = read_lgg_tif_images(folder)
    masks = mask_files(folder)
    labels = []
    for number in numbers:
        if int(number) in masks:
            labels.append(read_mask_tiff(masks[int(number)], images.shape[2:]))
        else:
            log.warning("%s: no mask for slice %d; using an empty mask", folder, number)
            labels.append(np.zeros(images.shape[2:], dtype=np.uint8))
    return images, np.stack(labels), numbers


def lgg_channels(images: np.ndarray, *, options: MriOptions) -> dict[str, np.ndarray]:
    """Role -> (Z, H, W) float32 channel of LGG slices (N, 3, H, W), by each role's lgg_channel.

    The roles are the configured sequences and the reference; a role whose `lgg_channel` is
    null is not in these files and is left out (imaging.mri.missing_sequence fills it).
    """
    channels = {}
    for role in dict.fromkeys((*options.sequences, options.reference)):
        channel = options.roles[role].lgg_channel
        if channel is not None:
            channels[role] = images[:, channel].astype(np.float32)
    return channels


def load_lgg_case(
    folder: str | os.PathLike[str], *, mask_path: str | os.PathLike[str] | None,
    options: MriOptions,
) -> CaseVolumes:
    """The case's channels (values as stored) and LGG-style masks, on the slices' own grid.

    `mask_path` is a folder of ``<case>_<n>_mask.tif`` (the case folder itself, or a copy
    under masks/), matched to the slices by number; None = no masks.
    """
    folder = Path(folder)
    images, numbers = read_lgg_tif_images(folder)
    channels = lgg_channels(images, options=options)
    if not channels:
        raise SeriesError(f"{folder}: none of the sequences {list(options.sequences)} has an "
                          "imaging.mri.roles.*.lgg_channel; expected at least one of them in "
                          "the LGG TIFFs' channels (0 pre-contrast T1, 1 FLAIR, 2 post-contrast)")
    masks = None
    if mask_path is not None:
        mask_path = Path(mask_path)
        kind = mask_kind(mask_path)
        if kind != "tiff":
            raise SeriesError(f"{mask_path}: {kind} masks, expected a folder of LGG-style "
                              "'<case>_<n>_mask.tif' slice masks (the LGG TIFFs have no "
                              "geometry to place other masks by)")
        masks = load_slice_masks(mask_path, numbers, images.shape[2:])
    reference = options.reference if options.reference in channels else next(iter(channels))
    return CaseVolumes(
        channels=channels, reference=reference,
        z=numbers.astype(np.float64) * ASSUMED_SLICE_GAP_MM, instance_numbers=numbers,
        pixel_spacing=ASSUMED_PIXEL_MM, slice_gap=ASSUMED_SLICE_GAP_MM,
        orientation=np.array(AXIAL_IDENTITY), masks=masks,
        mask_source="tiff" if masks is not None else "none",
        attrs={"source_layout": "lgg_tif", "source": str(folder), "geometry": NO_GEOMETRY},
    )
