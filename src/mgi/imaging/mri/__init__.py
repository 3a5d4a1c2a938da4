"""MRI: a case's MR studies (plus tumour masks) into a normalised, multi-sequence slice bank.

One module per concern:

- `dicom`: DICOM MR series (classic and enhanced) read into volumes with their geometry;
- `choice`: which series of a study feeds each sequence role (channel), from the DICOM tags;
- `grid`: every chosen series resampled (and optionally registered) onto the reference grid;
- `masks`: tumour masks of three kinds (LGG slice TIFFs, NIfTI label maps, DICOM-SEG);
- `normalise`: brain masks and per-volume intensity normalisation;
- `lgg`, `nifti`: the LGG segmentation set's slice TIFFs and BraTS-style NIfTI volumes;
- `build`: one case folder (any layout) into its bank (`build_mri_bank`), a failed bank on
  bad data.
"""

from mgi.imaging.mri.build import build_mri_bank
from mgi.imaging.mri.dicom import MRSeries, read_series
from mgi.imaging.mri.lgg import read_lgg_tif_slices
from mgi.imaging.mri.masks import (
    MASK_KINDS,
    load_masks,
    load_slice_masks,
    mask_kind,
    read_nifti_masks,
    read_seg_masks,
)
from mgi.imaging.mri.normalise import brain_mask, normalise_volume

__all__ = [
    "MASK_KINDS",
    "MRSeries",
    "brain_mask",
    "build_mri_bank",
    "load_masks",
    "load_slice_masks",
    "mask_kind",
    "normalise_volume",
    "read_lgg_tif_slices",
    "read_nifti_masks",
    "read_seg_masks",
    "read_series",
]
