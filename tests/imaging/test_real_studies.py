"""Realistic studies (mgi.acquire.studies) through the MRI stage: the right series for every role,
every channel on the FLAIR's grid with the phantom lesion at the same voxels, masks on that grid.

The generator writes each patient's study as TCIA delivers it (localizers, DWI and ADC,
sagittal and coronal distractors, site-specific descriptions, a T1-weighted FLAIR trap, a 3-D
sagittal post-contrast T1, sequences on other grids, motion, another frame of reference) by
sampling one analytic head phantom in patient coordinates, so where the lesion must appear on
any grid is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from mgi.acquire.studies import KINDS, Grid, phantom_values, write_cohort_studies, write_study
from mgi.imaging.bank import read_bank
from mgi.imaging.mri import build_mri_bank, read_series
from mgi.imaging.mri.choice import choose_series, scan_case
from tests.imaging.conftest import mri_options

ROLES = ("T1 pre", "FLAIR", "T1 post")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """One patient of every kind of study, the site's naming style cycling with them."""
    root = tmp_path_factory.mktemp("studies")
    return write_cohort_studies(root, case_ids=[f"TCGA-AA-{i:04d}" for i in range(len(KINDS))],
                                seed=0, size=32)


def test_every_role_gets_the_series_the_study_was_written_with(cohort):
    options = mri_options(sequences=[*ROLES, "T2"])
    for case_id, truth in cohort.items():
        choice = choose_series(scan_case(truth.patient_dir), case_id=case_id, options=options)
        expected = {role: truth.roles.get(role) for role in options.sequences}
        chosen = {role: choice.uids.get(role) for role in options.sequences}
        assert chosen == expected, (truth.kind, truth.site, choice.summary())
        # the audit holds every series of the patient, each with a reason
        assert set(choice.table["SeriesInstanceUID"]) == set(truth.series)
        assert choice.table["reason"].str.len().gt(0).all()


def _lesion_offset(channel: np.ndarray, expected: np.ndarray, lesion: np.ndarray
                   ) -> tuple[tuple[int, int, int], float, float]:
    """The voxel shift of `expected` (the phantom on the reference grid) that best matches
    `channel` around the lesion: (shift, correlation at that shift, correlation unshifted)."""
    zz, yy, xx = np.nonzero(lesion)
    box = (slice(max(zz.min() - 1, 0), zz.max() + 2), slice(max(yy.min() - 3, 0), yy.max() + 4),
           slice(max(xx.min() - 3, 0), xx.max() + 4))
    scores = {}
    for shift in np.ndindex(3, 7, 7):
        shift = (shift[0] - 1, shift[1] - 3, shift[2] - 3)
        moved = np.roll(expected, shift, axis=(0, 1, 2))
        scores[shift] = np.corrcoef(channel[box].ravel(), moved[box].ravel())[0, 1]
    best = max(scores, key=scores.get)
    return best, scores[best], scores[(0, 0, 0)]


def _bank(truth, tmp_path, register: str):
    """The patient's bank at the FLAIR's own matrix (no resizing), all slices kept."""
    flair = read_series(truth.folder("FLAIR"))
    options = mri_options(image_px=flair.volume.shape[2], register=register, keep_slices="all",
                          clip_percentiles=[0, 100])
    masks = truth.write_lgg_masks(tmp_path / "masks" / truth.case_id)
    out = tmp_path / f"{truth.case_id}-{register}.h5"
    row = build_mri_bank(image_id=truth.case_id, case_id=truth.case_id,
                         series_root=truth.patient_dir, mask_dir=masks, out_path=out,
                         options=options)
    return row, (read_bank(out) if row["status"] == "ok" else None), flair, options


@pytest.mark.parametrize("kind", ["standard", "sagittal_3d_post", "t1_flair", "motion",
                                  "other_frame"])
def test_channels_are_aligned_on_the_flair_grid_with_the_lesion_at_the_same_voxels(
        tmp_path, kind):
    truth = write_study(tmp_path / "studies", case_id="TCGA-AB-0001", kind=kind, size=64)
    row, bank, flair, options = _bank(truth, tmp_path, "rigid")
    assert row["status"] == "ok", row["reason"]
    lesion = truth.lesion_mask_on(flair)
    assert lesion.any()
    # the masks drawn on the FLAIR are the truth on the reference grid, slice for slice
    assert np.array_equal(bank.masks.astype(bool), lesion)
    points = Grid.from_series(flair).points().reshape(-1, 3)
    for k, role in enumerate(options.sequences):
        series = truth.series[truth.roles[role]]
        expected = phantom_values(points, contrast=series.spec.contrast, lesion=truth.lesion,
                                  head=truth.head).reshape(lesion.shape)
        shift, best, unshifted = _lesion_offset(bank.images[:, k].astype(np.float64),
                                                expected, lesion)
        # the lesion where the phantom puts it, in every channel, within interpolation noise
        assert shift == (0, 0, 0) or best - unshifted < 0.02, (role, shift, best, unshifted)
        assert unshifted > 0.6, (role, unshifted)


def test_rigid_registration_undoes_motion_that_the_geometry_does_not_record(tmp_path):
    truth = write_study(tmp_path / "studies", case_id="TCGA-AB-0002", kind="motion", size=64)
    aligned = {}
    for register in ("none", "rigid"):
        row, bank, flair, options = _bank(truth, tmp_path, register)
        assert row["status"] == "ok"
        lesion = truth.lesion_mask_on(flair)
        points = Grid.from_series(flair).points().reshape(-1, 3)
        post = options.sequences.index("T1 post")
        expected = phantom_values(points, contrast="t1post", lesion=truth.lesion,
                                  head=truth.head).reshape(lesion.shape)
        aligned[register] = _lesion_offset(bank.images[:, post].astype(np.float64), expected,
                                           lesion)
    # resampled by geometry alone, the moved series' lesion sits voxels away from where it is
    shift, best, unshifted = aligned["none"]
    assert shift != (0, 0, 0) and best - unshifted > 0.1
    # registered, it is back where the phantom puts it (within interpolation noise)
    shift, best, unshifted = aligned["rigid"]
    assert shift == (0, 0, 0) or best - unshifted < 0.02
    assert unshifted > aligned["none"][2] + 0.1


def test_another_frame_of_reference_needs_registration(tmp_path):
    truth = write_study(tmp_path / "studies", case_id="TCGA-AB-0003", kind="other_frame")
    row, _, _, _ = _bank(truth, tmp_path, "none")
    assert row["status"] == "failed"
    assert "FrameOfReferenceUID" in row["reason"] and "register: rigid" in row["reason"]
