"""The LGG segmentation set (Buda et al. 2019): 3-channel slice TIFFs with FLAIR masks."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import tifffile

from mgi.errors import SeriesError
from mgi.imaging.mri.masks import MASK_NAME, mask_files, read_mask_tiff

log = logging.getLogger(__name__)

_LGG_IMAGE_NAME = re.compile(r"^(?P<prefix>.+)_(?P<number>\d+)\.tiff?$", re.IGNORECASE)


def read_lgg_tif_slices(
    folder: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (images (N, 3, H, W) uint8, masks (N, H, W) uint8 0/1, slice numbers) of an LGG case.

    Reads the LGG segmentation set layout (``{case}_{n}.tif`` RGB = pre-contrast, FLAIR,
    post-contrast; ``{case}_{n}_mask.tif`` 0/255), ordered by slice number, not file name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SeriesError(f"{folder}: LGG slice folder not found")
    images: dict[int, Path] = {}
    for path in folder.iterdir():
        match = _LGG_IMAGE_NAME.match(path.name)
        if match and not MASK_NAME.match(path.name):
            images[int(match["number"])] = path
    if not images:
        raise SeriesError(f"{folder}: no LGG slice '<case>_<n>.tif' found")
    masks = mask_files(folder)
    numbers = np.array(sorted(images), dtype=np.int64)
    pixels, labels = [], []
    for number in numbers:
        path = images[int(number)]
        try:
            image = tifffile.imread(path)
        except (OSError, ValueError) as err:
            raise SeriesError(f"{path}: unreadable TIFF ({err})") from err
        if image.ndim != 3 or image.shape[2] != 3:
            raise SeriesError(f"{path}: shape {image.shape}, expected (H, W, 3)")
        pixels.append(image)
        if int(number) in masks:
            labels.append(read_mask_tiff(masks[int(number)], image.shape[:2]))
        else:
            log.warning("%s: no mask for slice %d; using an empty mask", folder, number)
            labels.append(np.zeros(image.shape[:2], dtype=np.uint8))
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise SeriesError(f"{folder}: slices of different shapes {sorted(shapes)}")
    stacked = np.stack(pixels).transpose(0, 3, 1, 2).astype(np.uint8, copy=False)
    return stacked, np.stack(labels), numbers
