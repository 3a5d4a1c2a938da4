"""Mask sources of the MRI bank: NIfTI label maps and DICOM-SEG, placed by patient coordinates.

The synthetic case (conftest `make_mr_case`) is axial, 16 x 16 pixels of 1 mm, slice n
(InstanceNumber) at ImagePositionPatient (-8, -8, 50 - 2.5 (n - 1)) in LPS: pixel (row r,
column c) of slice n lies at LPS (c - 8, r - 8, z_n), that is RAS (8 - c, 8 - r, z_n).
"""

from __future__ import annotations

import logging
import math
import shutil

import nibabel
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from mgi.errors import SeriesError
from mgi.imaging.bank import read_bank
from mgi.imaging.mri import build_mri_bank, load_masks, mask_kind, read_series
from tests.imaging.conftest import mri_options

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

# Tumour truth in series terms: (InstanceNumber, row, column) -> label (any label > 0 is tumour)
BLOB = {(4, r, c): 2 for r in (3, 4) for c in (6, 7, 8, 9)}  # 2 rows x 4 columns
TRUTH = {**BLOB, (1, 12, 2): 1}

# NIfTI layouts of the same 16 x 16 x 6 grid: voxel index of series pixel (n, r, c), and affine
LAYOUTS = {
    # voxel (c, r, n - 1): the DICOM LPS order, slices stored by InstanceNumber (z going down)
    "lps, slices reversed": (
        lambda n, r, c: (c, r, n - 1),
        [[-1, 0, 0, 8], [0, -1, 0, 8], [0, 0, -2.5, 50], [0, 0, 0, 1]],
    ),
    # what nibabel.as_closest_canonical gives: every axis increasing in RAS
    "ras canonical": (
        lambda n, r, c: (15 - c, 15 - r, 6 - n),
        [[1, 0, 0, -7], [0, 1, 0, -7], [0, 0, 2.5, 37.5], [0, 0, 0, 1]],
    ),
    # first array axis along the rows, second along the columns
    "rows and columns swapped": (
        lambda n, r, c: (r, c, n - 1),
        [[0, -1, 0, 8], [-1, 0, 0, 8], [0, 0, -2.5, 50], [0, 0, 0, 1]],
    ),
}


def _write_nifti(path, labels, affine):
    nibabel.save(nibabel.Nifti1Image(np.asarray(labels, dtype=np.int16),
                                     np.asarray(affine, dtype=float)), path)
    return path


def _layout_nifti(path, layout, *, shape=(16, 16, 6), truth=TRUTH):
    index, affine = LAYOUTS[layout]
    labels = np.zeros(shape, dtype=np.int16)
    for (n, r, c), value in truth.items():
        labels[index(n, r, c)] = value
    return _write_nifti(path, labels, affine)


def _expected(series, truth=TRUTH):
    """(Z, H, W) masks of `truth` in the series' slice order."""
    masks = np.zeros(series.volume.shape, dtype=np.uint8)
    row_of = {int(n): i for i, n in enumerate(series.instance_numbers)}
    for n, r, c in truth:
        masks[row_of[n], r, c] = 1
    return masks


def _bank(case, tmp_path, mask_path, **options):
    settings = {"image_px": 16, "clip_percentiles": (0.0, 100.0), **options}
    out = tmp_path / "bank" / "img.h5"
    row = build_mri_bank(image_id="img", case_id=case.case_id, series_root=case.root,
                         mask_dir=mask_path, out_path=out, options=mri_options(**settings))
    return row, read_bank(out)


def write_seg(path, frames, *, shape=(16, 16), segments=(1, 2), fractional=False,
              orientation=AXIAL, spacing=(1.0, 1.0)):
    """A minimal DICOM-SEG: `frames` is a list of (ImagePositionPatient, segment, 2-D mask)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SegmentationStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SEG"
    ds.PatientID = "CASE-1"
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns = shape
    ds.NumberOfFrames = len(frames)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    items = []
    for number in segments:
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = f"segment {number}"
        item.SegmentAlgorithmType = "MANUAL"
        items.append(item)
    ds.SegmentSequence = Sequence(items)
    shared, plane, measures = Dataset(), Dataset(), Dataset()
    plane.ImageOrientationPatient = list(orientation)
    measures.PixelSpacing = list(spacing)
    measures.SliceThickness = 2.0
    shared.PlaneOrientationSequence = Sequence([plane])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for position, segment, _ in frames:
        item, where, identity = Dataset(), Dataset(), Dataset()
        where.ImagePositionPatient = [float(v) for v in position]
        identity.ReferencedSegmentNumber = segment
        item.PlanePositionSequence = Sequence([where])
        item.SegmentIdentificationSequence = Sequence([identity])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    pixels = np.stack([mask for _, _, mask in frames])
    if fractional:
        ds.SegmentationType = "FRACTIONAL"
        ds.SegmentationFractionalType = "PROBABILITY"
        ds.MaximumFractionalValue = 255
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        ds.SegmentationType = "BINARY"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PixelData = pack_bits((pixels > 0).astype(np.uint8))  # LSB first, padded to even
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _blob_frames(case, truth=TRUTH):
    """One SEG frame per (slice, pixel) of `truth`, segment 1 or 2 by label, in shuffled order."""
    frames = []
    for n, r, c in truth:
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[r, c] = 1
        frames.append(((-8.0, -8.0, case.z[n]), 1 if truth[n, r, c] == 1 else 2, mask))
    order = np.random.default_rng(1).permutation(len(frames))
    return [frames[i] for i in order]


# --- dispatch -------------------------------------------------------------------------------


def test_mask_kind_by_what_the_path_is(mr_case, tmp_path, dicom_writers):
    assert mask_kind(mr_case.mask_dir) == "tiff"
    assert mask_kind(tmp_path / "absent") == "tiff"  # the TIFF reader reports it, as before
    assert mask_kind(tmp_path / "seg.nii.gz") == "nifti"
    assert mask_kind(tmp_path / "SEG.NII") == "nifti"
    seg = write_seg(tmp_path / "seg" / "seg.dcm", _blob_frames(mr_case))
    assert mask_kind(seg) == "dicom-seg"
    assert mask_kind(seg.parent) == "dicom-seg"
    (tmp_path / "notes.txt").write_text("no mask here")
    with pytest.raises(SeriesError, match=r"notes\.txt: mask file is neither a NIfTI"):
        mask_kind(tmp_path / "notes.txt")


def test_tiff_masks_unchanged_and_recorded(mr_case, tmp_path):
    series = read_series(mr_case.folders["FLAIR"])
    masks = load_masks(mr_case.mask_dir, series)
    tumour = masks[series.instance_numbers == mr_case.tumour_instance][0]
    assert tumour[5:9, 6:10].all() and masks.sum() == 16
    row, bank = _bank(mr_case, tmp_path, mr_case.mask_dir)
    assert row["status"] == "ok" and bank.attrs["mask_source"] == "tiff"
    _, no_masks = _bank(mr_case, tmp_path, None)
    assert no_masks.attrs["mask_source"] == "none" and no_masks.masks is None


# --- NIfTI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_nifti_label_map_lands_on_the_right_slices_and_pixels(mr_case, tmp_path, layout):
    path = _layout_nifti(tmp_path / "seg.nii.gz", layout)
    series = read_series(mr_case.folders["FLAIR"])
    masks = load_masks(path, series)
    assert masks.dtype == np.uint8 and masks.shape == (6, 16, 16)
    np.testing.assert_array_equal(masks, _expected(series))
    on_four = masks[series.instance_numbers == 4][0]
    assert on_four[3:5, 6:10].all() and on_four.sum() == 8  # 2 rows x 4 columns, not 4 x 2


def test_nifti_masks_in_the_bank(mr_case, tmp_path):
    path = _layout_nifti(tmp_path / "seg.nii", "lps, slices reversed")
    row, bank = _bank(mr_case, tmp_path, path, keep_slices="tumour")
    assert row["status"] == "ok", row["reason"]
    assert bank.attrs["mask_source"] == "nifti"
    assert bank.coords[:, 1].tolist() == [4, 1]  # ascending z: InstanceNumber 4 below 1
    assert bank.masks[0][3:5, 6:10].all() and bank.masks[0].sum() == 8
    assert bank.masks[1][12, 2] == 1 and bank.masks[1].sum() == 1


def test_nifti_on_an_oblique_series(tmp_path, dicom_writers):
    angle = math.radians(30)
    x_dir = np.array([math.cos(angle), math.sin(angle), 0.0])
    y_dir = np.array([-math.sin(angle), math.cos(angle), 0.0])
    normal = np.cross(x_dir, y_dir)
    origin = np.array([-3.0, 5.0, 10.0])
    uid = generate_uid()
    for k in range(4):
        dicom_writers.slice(tmp_path / "series" / f"{k}.dcm", np.full((8, 8), 60),
                            position=tuple(origin + 2.0 * k * normal), instance=k + 1,
                            series_uid=uid, description="FLAIR",
                            orientation=(*x_dir, *y_dir), spacing=(1.0, 1.0))
    # voxel (column, row, slice) -> LPS origin + c X + r Y + 2 k N -> RAS: negate x and y
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.column_stack([x_dir, y_dir, 2.0 * normal])
    affine[:3, 3] = origin * [-1.0, -1.0, 1.0]
    labels = np.zeros((8, 8, 4), dtype=np.int16)
    labels[5, 1, 2] = 3  # column 5, row 1 of the third slice
    path = _write_nifti(tmp_path / "oblique.nii.gz", labels, affine)
    masks = load_masks(path, read_series(tmp_path / "series"))
    assert np.argwhere(masks).tolist() == [[2, 1, 5]]


def test_nifti_of_the_wrong_grid_is_refused_naming_the_file(mr_case, tmp_path):
    series = read_series(mr_case.folders["FLAIR"])
    small = _layout_nifti(tmp_path / "small.nii.gz", "lps, slices reversed", shape=(8, 8, 6),
                          truth={})
    with pytest.raises(SeriesError, match=r"small\.nii\.gz: label map grid \(8, 8, 6\).*covers "
                                          r"only part of the slice.*expected a label map on "
                                          r"the series' grid \(6 slices of 16 x 16"):
        load_masks(small, series)
    _, affine = LAYOUTS["lps, slices reversed"]
    away = np.array(affine, dtype=float)
    away[2, 3] += 100.0  # the whole grid 100 mm above the series
    far = _write_nifti(tmp_path / "far.nii", np.zeros((16, 16, 6)), away)
    with pytest.raises(SeriesError, match=r"far\.nii: label map grid .* does not cover the "
                                          r"series: 6 of 6 slices"):
        load_masks(far, series)
    row, _ = _bank(mr_case, tmp_path, small)
    assert row["status"] == "failed" and "small.nii.gz" in row["reason"]


def test_nifti_missing_a_slice_gives_an_empty_mask_with_warning(mr_case, tmp_path, caplog):
    # 5 slices of 6: InstanceNumber 6 (k = 5) has no voxel
    path = _layout_nifti(tmp_path / "short.nii.gz", "lps, slices reversed", shape=(16, 16, 5))
    series = read_series(mr_case.folders["FLAIR"])
    with caplog.at_level(logging.WARNING, logger="mgi.imaging.mri"):
        masks = load_masks(path, series)
    np.testing.assert_array_equal(masks, _expected(series))
    assert "1 of 6 slices" in caplog.text and "short.nii.gz" in caplog.text


def test_unreadable_nifti_is_named(mr_case, tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"not gzip at all")
    series = read_series(mr_case.folders["FLAIR"])
    with pytest.raises(SeriesError, match=r"broken\.nii\.gz: unreadable NIfTI label map"):
        load_masks(tmp_path / "broken.nii.gz", series)
    with pytest.raises(SeriesError, match=r"absent\.nii: NIfTI label map not found"):
        load_masks(tmp_path / "absent.nii", series)


# --- DICOM-SEG ------------------------------------------------------------------------------


def test_dicom_seg_frames_in_shuffled_order_land_on_their_slices(mr_case, tmp_path):
    frames = _blob_frames(mr_case)
    assert [f[0][2] for f in frames] != sorted(f[0][2] for f in frames)
    path = write_seg(tmp_path / "seg" / "seg.dcm", frames)
    series = read_series(mr_case.folders["FLAIR"])
    np.testing.assert_array_equal(load_masks(path, series), _expected(series))
    np.testing.assert_array_equal(load_masks(path.parent, series), _expected(series))


def test_dicom_seg_unites_segments_and_packed_frames(mr_case, tmp_path):
    # whole-slice frames: segment 1 and 2 on InstanceNumber 3 overlap; the bits of one frame
    # (256 pixels) are packed straight after the other's
    one = np.zeros((16, 16), dtype=np.uint8)
    one[2:6, 1:4] = 1
    two = np.zeros((16, 16), dtype=np.uint8)
    two[4:9, 3:11] = 1
    z3 = mr_case.z[3]
    path = write_seg(tmp_path / "seg.dcm", [((-8, -8, z3), 2, two), ((-8, -8, z3), 1, one)])
    row, bank = _bank(mr_case, tmp_path, path, keep_slices="tumour")
    assert row["status"] == "ok", row["reason"]
    assert bank.attrs["mask_source"] == "dicom-seg"
    assert bank.coords[:, 1].tolist() == [3]
    np.testing.assert_array_equal(bank.masks[0], one | two)


def test_fractional_dicom_seg_is_tumour_from_half_the_maximum(mr_case, tmp_path):
    frame = np.zeros((16, 16), dtype=np.uint8)
    frame[1, 1], frame[2, 2], frame[3, 3] = 255, 128, 127
    path = write_seg(tmp_path / "frac.dcm", [((-8, -8, mr_case.z[5]), 1, frame)],
                     fractional=True)
    series = read_series(mr_case.folders["FLAIR"])
    masks = load_masks(path, series)
    row = int(np.flatnonzero(series.instance_numbers == 5)[0])
    assert np.argwhere(masks).tolist() == [[row, 1, 1], [row, 2, 2]]


def test_dicom_seg_frames_off_the_slices(mr_case, tmp_path, caplog):
    series = read_series(mr_case.folders["FLAIR"])
    mask = np.ones((16, 16), dtype=np.uint8)
    between = write_seg(tmp_path / "between.dcm", [((-8, -8, mr_case.z[2] - 1.25), 1, mask)])
    with pytest.raises(SeriesError, match=r"between\.dcm: no frame lies on a slice"):
        load_masks(between, series)
    some = write_seg(tmp_path / "some.dcm", [((-8, -8, mr_case.z[2] - 1.25), 1, mask),
                                             ((-8, -8, mr_case.z[2] + 0.1), 1, mask)])
    with caplog.at_level(logging.WARNING, logger="mgi.imaging.mri"):
        masks = load_masks(some, series)
    assert masks.reshape(6, -1).any(axis=1).tolist() == (series.instance_numbers == 2).tolist()
    assert "1 frame(s) lie on no slice" in caplog.text
    shifted = write_seg(tmp_path / "shifted.dcm", [((-5, -8, mr_case.z[2]), 1, mask)])
    with pytest.raises(SeriesError, match=r"shifted\.dcm: frame ImagePositionPatient lies "
                                          r"3\.00 mm in-plane"):
        load_masks(shifted, series)


def test_dicom_seg_of_another_matrix_or_orientation_is_refused(mr_case, tmp_path):
    series = read_series(mr_case.folders["FLAIR"])
    small = write_seg(tmp_path / "small.dcm",
                      [((-8, -8, mr_case.z[1]), 1, np.ones((8, 8), dtype=np.uint8))], shape=(8, 8))
    with pytest.raises(SeriesError, match=r"small\.dcm: Rows x Columns 8 x 8, expected 16 x 16"):
        load_masks(small, series)
    sagittal = write_seg(tmp_path / "sagittal.dcm",
                         [((-8, -8, mr_case.z[1]), 1, np.ones((16, 16), dtype=np.uint8))],
                         orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    with pytest.raises(SeriesError, match=r"sagittal\.dcm: ImageOrientationPatient .*expected "
                                          r"the series'"):
        load_masks(sagittal, series)


def test_non_seg_dicom_as_mask_is_refused(mr_case, tmp_path, dicom_writers):
    series = read_series(mr_case.folders["FLAIR"])
    mr_file = tmp_path / "mask" / "slice.dcm"
    mr_file.parent.mkdir()
    shutil.copy(series.files[0], mr_file)
    expected = r"not a DICOM-SEG mask: Modality 'MR'.*expected Modality 'SEG' with Segmentation"
    with pytest.raises(SeriesError, match=rf"slice\.dcm: {expected}"):
        load_masks(mr_file, series)
    with pytest.raises(SeriesError, match=rf"slice\.dcm: {expected}"):
        load_masks(mr_file.parent, series)  # a folder of DICOM without mask TIFFs
    ct = dicom_writers.ct(tmp_path / "ct" / "ct.dcm")
    row, _ = _bank(mr_case, tmp_path, ct.parent)
    assert row["status"] == "failed"
    assert "ct.dcm: not a DICOM-SEG mask: Modality 'CT'" in row["reason"]
