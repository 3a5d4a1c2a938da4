"""Realistic TCIA-style MR studies: files, geometry, the phantom in every series, the traps."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.pixels import apply_rescale
from pydicom.uid import EnhancedMRImageStorage, MRImageStorage

from mgi.acquire import studies
from mgi.acquire.studies import (
    KINDS,
    NOISE_SD,
    Grid,
    Head,
    Lesion,
    StudyTruth,
    lesion_mask,
    lesion_membership,
    phantom_values,
    write_cohort_studies,
    write_study,
)
from mgi.errors import AcquireError, SeriesError
from mgi.imaging.mri.dicom import read_series
from mgi.imaging.mri.masks import load_slice_masks

CASES = [f"TCGA-XX-{i:04d}" for i in range(len(KINDS))]
STUDY_DIR = re.compile(r"^\d{2}-\d{2}-\d{4}-NA-[^/\\:*?\"<>|]+-\d{5}$")
SERIES_DIR = re.compile(r"^(?P<number>\d+)\.000000-(?P<description>[^/\\:*?\"<>|]+)-\d{5}$")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StudyTruth]:
    """One study of every kind (sites cycling), 32 px, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("tcia") / "TCGA-LGG"
    return write_cohort_studies(root, case_ids=CASES, seed=0, size=32)


def _by_kind(cohort: dict[str, StudyTruth], kind: str) -> StudyTruth:
    return next(t for t in cohort.values() if t.kind == kind)


def _frames(path: Path):
    """(physical pixels, IPP, IOP, PixelSpacing, volume key) of every frame of one file."""
    ds = pydicom.dcmread(path)
    if str(ds.SOPClassUID) == EnhancedMRImageStorage:
        shared = ds.SharedFunctionalGroupsSequence[0]
        transform = shared.PixelValueTransformationSequence[0]
        pixels = ds.pixel_array * float(transform.RescaleSlope) + float(transform.RescaleIntercept)
        iop = shared.PlaneOrientationSequence[0].ImageOrientationPatient
        spacing = shared.PixelMeasuresSequence[0].PixelSpacing
        for frame, plane in zip(ds.PerFrameFunctionalGroupsSequence, pixels, strict=True):
            yield plane, frame.PlanePositionSequence[0].ImagePositionPatient, iop, spacing, 0
        return
    key = float(ds.DiffusionBValue) if "DiffusionBValue" in ds else int(ds.EchoNumbers)
    yield (apply_rescale(ds.pixel_array, ds), ds.ImagePositionPatient,
           ds.ImageOrientationPatient, ds.PixelSpacing, key)


def _volume_index(spec: studies.SeriesSpec, key: float | int) -> int:
    echoes = spec.echoes
    if len(echoes) == 1:
        return 0
    if echoes[0].b_value is not None:
        return [e.b_value for e in echoes].index(key)
    return [e.echo_number for e in echoes].index(key)


def _residuals(truth: StudyTruth, series: studies.SeriesTruth, *, lesion: Lesion | None,
               moved: bool = True) -> tuple[np.ndarray, float]:
    """|pixels - phantom at each file's own voxel centres| over the series, and the noise SD."""
    spec = series.spec
    out, sds = [], []
    for path in sorted(series.folder.iterdir()):
        for pixels, ipp, iop, spacing, key in _frames(path):
            points = studies._plane_points(np.array([ipp], float), np.array(iop, float),
                                           spacing, pixels.shape)[0]
            if moved and spec.motion is not None:
                points = spec.motion.to_anatomy(points, truth.head.centre_mm)
            echo = spec.echoes[_volume_index(spec, key)]
            clean = phantom_values(points, contrast=echo.contrast, lesion=lesion,
                                   head=truth.head)
            out.append(np.abs(pixels - clean).ravel())
            sds.append(spec.noise_sd or NOISE_SD[echo.contrast])
    return np.concatenate(out), max(sds)


# --- the phantom ---------------------------------------------------------------------------------


def test_phantom_contrasts_follow_the_sequences():
    head = Head()
    lesion = Lesion(centre_mm=(30.0, 0.0, 20.0), radius_mm=(15.0, 15.0, 15.0))
    points = np.array([
        [30.0, 0.0, 20.0],  # lesion core
        [30.0, 0.0, 20.0 + 13.0],  # enhancing rim (outer quarter of the radius)
        [-30.0, 0.0, 20.0],  # white matter, mirrored
        [9.0, -4.0, 12.0],  # ventricle
        [0.0, 0.0, 200.0],  # air
    ])
    value = {c: phantom_values(points, contrast=c, lesion=lesion, head=head)
             for c in ("flair", "t1", "t1post", "t2")}
    core, rim, wm, csf, air = range(5)
    assert value["flair"][core] > 1.8 * value["flair"][wm] > 1.8 * value["flair"][csf]
    assert value["t1"][core] < 0.6 * value["t1"][wm] and value["t1"][csf] < value["t1"][core]
    assert value["t1post"][rim] > 1.5 * value["t1post"][wm] > 1.5 * value["t1post"][core]
    assert value["t2"][csf] > value["t2"][core] > value["t2"][wm]
    assert all(v[air] == 0 for v in value.values())
    assert lesion_mask(points, lesion).tolist() == [True, True, False, False, False]
    assert lesion_membership(points[:1], lesion)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="contrast"):
        phantom_values(points, contrast="t7", lesion=lesion, head=head)


# --- files and layout ----------------------------------------------------------------------------


def test_every_file_is_an_mr_object_of_its_patient_in_the_nbia_layout(cohort):
    for case_id, truth in cohort.items():
        assert truth.patient_dir.name == case_id
        study_dirs = sorted(p for p in truth.patient_dir.iterdir())
        assert len(study_dirs) == len(truth.studies) == (2 if truth.kind == "two_studies" else 1)
        for study_dir in study_dirs:
            assert STUDY_DIR.match(study_dir.name), study_dir.name
            for series_dir in study_dir.iterdir():
                match = SERIES_DIR.match(series_dir.name)
                assert match, series_dir.name
                files = sorted(series_dir.iterdir())
                ds = pydicom.dcmread(files[0], stop_before_pixels=True)
                assert ds.SeriesInstanceUID.endswith(series_dir.name[-5:])
                assert int(match["number"]) == ds.SeriesNumber
                assert match["description"] == studies.safe_name(ds.SeriesDescription)
                assert study_dir.name.endswith(ds.StudyInstanceUID[-5:])
                for path in files:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    assert ds.Modality == "MR" and ds.PatientID == ds.PatientName == case_id
                    assert ds.SOPClassUID in (MRImageStorage, EnhancedMRImageStorage)
                    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                    if truth.site == "terse":  # old downloads: named by SOPInstanceUID
                        assert path.name == f"{ds.SOPInstanceUID}.dcm"
                    else:  # NBIA Data Retriever: 1-NN in InstanceNumber order
                        width = max(2, len(str(len(files))))
                        assert path.name == f"1-{int(ds.InstanceNumber):0{width}d}.dcm"


def test_unsafe_characters_in_descriptions_are_replaced_in_folder_names(cohort):
    ge = _by_kind(cohort, "standard")
    assert ge.site == "ge"
    names = [p.name for p in ge.patient_dir.rglob("*") if p.is_dir()]
    assert any("MRI BRAIN W_WO CONTRAST" in n for n in names)
    assert any("Apparent Diffusion Coefficient (mm2_s)" in n for n in names)
    assert studies.safe_name('a/b\\c:d*e?"<>|') == "a_b_c_d_e_____"
    assert studies.safe_name("") == "NA"


def test_single_volume_series_are_read_by_the_mr_reader_on_their_written_grid(cohort):
    for truth in cohort.values():
        for uid, series in truth.series.items():
            spec = series.spec
            if spec.plane == "3plane" or len(spec.echoes) > 1:
                continue
            mr = read_series(series.folder)
            assert mr.series_uid == uid and mr.series_description == series.description
            assert mr.volume.shape == (spec.n_slices, *spec.matrix)
            assert mr.slice_gap == pytest.approx(spec.slice_step, abs=1e-3)
            assert mr.pixel_spacing == pytest.approx(spec.pixel_spacing)
            grid = spec.grid()
            assert np.allclose(mr.positions, grid.positions, atol=1e-3)
            assert np.allclose(mr.orientation, grid.orientation, atol=1e-6)


def test_the_localizer_is_one_series_in_three_planes_that_the_reader_refuses(cohort):
    truth = _by_kind(cohort, "standard")
    loc = next(s for s in truth.series.values() if s.spec.plane == "3plane")
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in loc.folder.iterdir()]
    assert len(datasets) == 3
    assert all(list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"] for ds in datasets)
    assert len({tuple(ds.ImageOrientationPatient) for ds in datasets}) == 3
    with pytest.raises(SeriesError, match="ImageOrientationPatient"):
        read_series(loc.folder)


def test_multi_volume_series_hold_two_volumes_at_the_same_positions(cohort):
    truth = _by_kind(cohort, "multi_echo")
    t2 = truth.series[truth.roles["T2"]]
    files = sorted(t2.folder.iterdir())
    assert len(files) == 2 * t2.spec.n_slices
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert [int(ds.EchoNumbers) for ds in datasets[:4]] == [1, 2, 1, 2]  # interleaved names
    assert [float(ds.EchoTime) for ds in datasets[:2]] == [15.0, 102.0]
    positions = {1: [], 2: []}
    for ds in datasets:
        positions[int(ds.EchoNumbers)].append(tuple(ds.ImagePositionPatient))
    assert positions[1] == positions[2] and len(set(positions[1])) == t2.spec.n_slices
    dwi = next(s for s in truth.series.values() if s.spec.echoes[0].b_value is not None)
    b_values = [float(pydicom.dcmread(p, stop_before_pixels=True).DiffusionBValue)
                for p in dwi.folder.iterdir()]
    assert sorted(set(b_values)) == [0.0, 1000.0] and b_values.count(0.0) == dwi.spec.n_slices


def test_enhanced_mr_series_hold_every_slice_in_one_multiframe_file(cohort):
    enhanced = [s for t in cohort.values() for s in t.series.values() if s.spec.enhanced]
    assert enhanced, "the cohort should hold an Enhanced MR series (Philips site)"
    for series in enhanced:
        (path,) = series.folder.iterdir()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.SOPClassUID == EnhancedMRImageStorage
        assert int(ds.NumberOfFrames) == series.spec.n_slices
        assert read_series(series.folder).volume.shape == (series.spec.n_slices,
                                                           *series.spec.matrix)


# --- the phantom is where the geometry says ------------------------------------------------------


def test_every_pixel_is_the_phantom_at_its_own_voxel_centre_plus_noise(cohort):
    for truth in cohort.values():
        for series in truth.series.values():
            residual, sd = _residuals(truth, series, lesion=truth.lesion)
            slope = series.spec.rescale[0]
            assert np.median(residual) < 1.3 * sd, series.folder.name
            assert np.percentile(residual, 99) < 4 * sd + slope, series.folder.name


def test_motion_and_repositioning_are_in_the_pixels_not_in_the_geometry(cohort):
    moved = [(t, s) for t in cohort.values() for s in t.series.values() if s.spec.motion]
    kinds = {t.kind for t, _ in moved}
    assert kinds == {"motion", "other_frame", "two_studies"}
    for truth, series in moved:
        residual, sd = _residuals(truth, series, lesion=truth.lesion, moved=False)
        assert np.percentile(residual, 99) > 10 * sd, series.folder.name


def test_the_lesion_shows_where_the_truth_says_in_every_series(cohort):
    for truth in cohort.values():
        for series in truth.series.values():
            spec = series.spec
            if spec.plane == "3plane":
                continue
            weights, points = [], []
            for path in series.folder.iterdir():
                for pixels, ipp, iop, spacing, key in _frames(path):
                    if _volume_index(spec, key) != 0:
                        continue
                    grid = studies._plane_points(np.array([ipp], float), np.array(iop, float),
                                                 spacing, pixels.shape)[0]
                    seen = (spec.motion.to_anatomy(grid, truth.head.centre_mm)
                            if spec.motion else grid)
                    healthy = phantom_values(seen, contrast=spec.echoes[0].contrast,
                                             lesion=None, head=truth.head)
                    diff = np.abs(pixels - healthy)
                    sd = spec.noise_sd or NOISE_SD[spec.echoes[0].contrast]
                    weights.append(np.where(diff > 5 * sd, diff, 0.0).ravel())
                    points.append(grid.reshape(-1, 3))
            w, p = np.concatenate(weights), np.concatenate(points)
            centroid = (w[:, None] * p).sum(axis=0) / w.sum()
            centre = np.asarray(series.lesion_centre_mm)
            iop = np.asarray(spec.grid().orientation)
            normal = np.cross(iop[:3], iop[3:])
            error = centroid - centre
            where = f"{truth.case_id} {series.description}"
            assert abs(error @ normal) <= spec.slice_step, where
            assert abs(error @ iop[:3]) <= spec.pixel_spacing[1], where
            assert abs(error @ iop[3:]) <= spec.pixel_spacing[0], where
            if spec.motion is None:  # the voxel nearest the lesion centre is within a voxel
                best = p[np.argmax(lesion_membership(p, truth.lesion))]
                assert np.abs(best - centre) @ np.abs(normal) <= spec.slice_step / 2 + 1e-6
            else:
                assert not np.allclose(centre, truth.lesion_centre_mm, atol=1.0)


def test_the_sequences_of_a_study_are_on_different_grids(cohort):
    truth = _by_kind(cohort, "standard")
    grids = {role: truth.series[uid].spec.grid() for role, uid in truth.roles.items()}
    assert set(grids) == {"FLAIR", "T1 pre", "T1 post", "T2"}
    for (a, ga), (b, gb) in itertools.combinations(grids.items(), 2):
        same = (ga.positions.shape == gb.positions.shape and ga.shape == gb.shape
                and np.allclose(ga.positions, gb.positions)
                and np.allclose(ga.pixel_spacing, gb.pixel_spacing))
        assert not same, (a, b)
    flair, t1 = grids["FLAIR"], grids["T1 pre"]
    assert flair.shape != t1.shape and flair.pixel_spacing != t1.pixel_spacing
    assert not np.allclose(grids["T1 post"].orientation, flair.orientation)  # oblique


# --- names, tags and traps per kind --------------------------------------------------------------


def _header(series: studies.SeriesTruth) -> pydicom.Dataset:
    return pydicom.dcmread(next(series.folder.iterdir()), stop_before_pixels=True)


def _role_headers(truth: StudyTruth) -> dict[str, pydicom.Dataset]:
    return {role: _header(truth.series[uid]) for role, uid in truth.roles.items()}


def test_standard_study_has_site_names_and_distractors(cohort):
    truth = _by_kind(cohort, "standard")
    headers = _role_headers(truth)
    assert {r: h.SeriesDescription for r, h in headers.items()} == {
        "FLAIR": "AX T2 FLAIR", "T1 pre": "AX T1", "T1 post": "AX T1 +C", "T2": "AX T2 FSE"}
    assert headers["T1 post"].ContrastBolusAgent and "ContrastBolusAgent" not in headers["T1 pre"]
    assert 1400 < float(headers["FLAIR"].InversionTime) < 4000
    others = {s.description: _header(s) for uid, s in truth.series.items()
              if uid not in truth.roles.values()}
    assert set(others) >= {"3 PLANE LOC", "AX DWI 1000b", "COR T1 +C",
                           "Apparent Diffusion Coefficient (mm2/s)"}
    assert set(others) & {"SAG T2 FLAIR", "SAG T1"}
    assert list(others["Apparent Diffusion Coefficient (mm2/s)"].ImageType)[:3] == [
        "DERIVED", "PRIMARY", "ADC"]
    frames = {h.FrameOfReferenceUID for h in [*headers.values(), *others.values()]}
    assert len(frames) == 1


def test_t1_flair_trap_has_a_short_inversion_time(cohort):
    truth = _by_kind(cohort, "t1_flair")
    headers = _role_headers(truth)
    assert "FLAIR" in headers["T1 pre"].SeriesDescription.upper()
    assert 700 <= float(headers["T1 pre"].InversionTime) <= 900
    assert 2000 <= float(headers["FLAIR"].InversionTime) <= 3000
    assert truth.series[truth.roles["FLAIR"]].spec.plane == "axial"


def test_t1_flair_sagittal_variant_leaves_the_trap_the_only_axial_flair(cohort):
    truth = _by_kind(cohort, "t1_flair_sagittal")
    flair = truth.series[truth.roles["FLAIR"]]
    assert flair.spec.plane == "sagittal" and "FLAIR" in flair.description
    axial_flair = [s for s in truth.series.values()
                   if "FLAIR" in s.description.upper() and s.spec.plane == "axial"]
    assert [s.folder for s in axial_flair] == [truth.folder("T1 pre")]
    assert float(_header(axial_flair[0]).InversionTime) < 1000
    mask = truth.lesion_mask_on()  # the reference is the sagittal FLAIR grid
    assert mask.shape == (flair.spec.n_slices, *flair.spec.matrix) and mask.any()


def test_no_post_study_has_no_contrast_series(cohort):
    truth = _by_kind(cohort, "no_post")
    assert set(truth.roles) == {"FLAIR", "T1 pre", "T2"}
    for series in truth.series.values():
        assert "ContrastBolusAgent" not in _header(series)
        assert not re.search(r"post|\+c|gd|gad", series.description, re.IGNORECASE)


def test_sagittal_3d_post_is_the_only_post_contrast_series(cohort):
    truth = _by_kind(cohort, "sagittal_3d_post")
    post = [s for s in truth.series.values() if s.spec.contrast == "t1post"]
    assert [s.folder for s in post] == [truth.folder("T1 post")]
    ds = _header(post[0])
    assert ds.MRAcquisitionType == "3D" and post[0].description in (
        "3D SPGR POST GAD", "t1_mprage_sag_post", "T1W_3D_TFE_SAG_GD", "SAG 3D T1 POST GD")
    assert post[0].spec.plane == "sagittal"
    assert post[0].spec.n_slices > 2 * truth.series[truth.roles["FLAIR"]].spec.n_slices


def test_two_studies_have_their_own_uids_dates_and_frames(cohort):
    truth = _by_kind(cohort, "two_studies")
    first, later = truth.studies
    assert first.study_uid != later.study_uid and first.study_date < later.study_date
    assert first.frame_of_reference_uid != later.frame_of_reference_uid
    assert {truth.series[uid].study_uid for uid in truth.roles.values()} == {first.study_uid}
    assert "T2" not in truth.roles  # only the follow-up has one (most_complete != earliest)
    in_later = [s for s in truth.series.values() if s.study_uid == later.study_uid]
    assert any(s.spec.contrast == "t2" for s in in_later)
    assert all(_header(s).StudyDate == later.study_date for s in in_later)
    # NBIA folder names (MM-DD-YYYY) sort the later study first
    assert sorted(truth.study_dirs.values())[0] == truth.study_dirs[later.study_uid]


def test_motion_series_keeps_the_study_frame_and_other_frame_series_does_not(cohort):
    motion = _by_kind(cohort, "motion")
    headers = _role_headers(motion)
    assert motion.series[motion.roles["T1 post"]].spec.motion is not None
    assert len({h.FrameOfReferenceUID for h in headers.values()}) == 1
    other = _by_kind(cohort, "other_frame")
    headers = _role_headers(other)
    assert headers["T1 pre"].FrameOfReferenceUID != headers["FLAIR"].FrameOfReferenceUID
    assert headers["T1 post"].FrameOfReferenceUID == headers["FLAIR"].FrameOfReferenceUID


def test_cohort_cycles_kinds_and_sites(cohort):
    assert [t.kind for t in cohort.values()] == list(KINDS)
    assert {t.site for t in cohort.values()} == set(studies.SITES)
    philips = next(t for t in cohort.values() if t.site == "philips")
    slopes = {float(_header(s).get("RescaleSlope", 1)) for s in philips.series.values()
              if not s.spec.enhanced and s.spec.contrast != "adc"}
    assert len(slopes) == 1 and slopes.pop() != 1.0


# --- truth masks ---------------------------------------------------------------------------------


def test_lesion_mask_on_any_description_of_the_reference_grid_agrees(cohort):
    truth = _by_kind(cohort, "standard")
    mr = read_series(truth.folder("FLAIR"))
    by_role = truth.lesion_mask_on("FLAIR")
    assert by_role.shape == mr.volume.shape and 0 < by_role.sum() < by_role.size // 10
    assert np.array_equal(by_role, truth.lesion_mask_on(truth.folder("FLAIR")))
    assert np.array_equal(by_role, truth.lesion_mask_on(str(truth.roles["FLAIR"])))
    assert np.array_equal(by_role, truth.lesion_mask_on(mr))
    assert np.array_equal(by_role, truth.lesion_mask_on(Grid.from_folder(mr.files[0].parent)))
    with pytest.raises(KeyError, match="no role"):
        truth.lesion_mask_on("T7")


def test_lgg_masks_of_the_flair_cover_its_bright_lesion(cohort, tmp_path):
    for truth in cohort.values():
        out = truth.write_lgg_masks(tmp_path / truth.case_id)
        mr = read_series(truth.folder("FLAIR"))
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted(f"{truth.case_id}_{n}_mask.tif" for n in mr.instance_numbers)
        sample = tifffile.imread(next(out.iterdir()))
        assert sample.dtype == np.uint8 and set(np.unique(sample)) <= {0, 255}
        masks = load_slice_masks(out, mr.instance_numbers, mr.volume.shape[1:]).astype(bool)
        assert np.array_equal(masks, truth.lesion_mask_on(mr))
        brain = mr.volume[mr.volume > 0.5 * np.percentile(mr.volume, 90)]
        bright = mr.volume > np.percentile(brain, 50) + 0.5 * (
            np.percentile(mr.volume[masks], 50) - np.percentile(brain, 50))
        dice = 2 * (bright & masks).sum() / (bright.sum() + masks.sum())
        assert dice > 0.7, (truth.case_id, dice)


# --- determinism and arguments -------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path):
    kwargs = {"case_id": "TCGA-AA-0001", "kind": "multi_echo", "size": 16}
    a = write_study(tmp_path / "a", seed=5, **kwargs)
    b = write_study(tmp_path / "b", seed=5, **kwargs)
    c = write_study(tmp_path / "c", seed=6, **kwargs)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert a.roles == b.roles and a.lesion == b.lesion
    assert set(c.roles.values()).isdisjoint(a.roles.values()) and c.lesion != a.lesion


def test_size_sets_the_matrix_and_keeps_the_coverage(tmp_path):
    small = write_study(tmp_path / "s", case_id="C", size=16, seed=1, site="siemens",
                        lesion_mm=(20.0, 10.0, 5.0))
    large = write_study(tmp_path / "l", case_id="C", size=64, seed=1, site="siemens",
                        lesion_mm=(20.0, 10.0, 5.0))
    assert large.lesion.centre_mm == (20.0, 10.0, 5.0) == small.lesion.centre_mm
    s, g = (t.series[t.roles["FLAIR"]].spec for t in (small, large))
    assert g.matrix == (64, 64) and s.matrix == (16, 16)
    assert g.n_slices >= s.n_slices >= 10
    assert g.n_slices * g.slice_step == pytest.approx(s.n_slices * s.slice_step, rel=0.01)
    assert g.matrix[0] * g.pixel_spacing[0] == pytest.approx(s.matrix[0] * s.pixel_spacing[0])


def test_write_study_refuses_unknown_kinds_sites_and_dates(tmp_path):
    with pytest.raises(AcquireError, match="kind"):
        write_study(tmp_path, case_id="C", kind="weird")
    with pytest.raises(AcquireError, match="site"):
        write_study(tmp_path, case_id="C", site="toshiba")
    with pytest.raises(AcquireError, match="YYYYMMDD"):
        write_study(tmp_path, case_id="C", study_date="1996-09-09")
    write_study(tmp_path, case_id="C", size=16)
    with pytest.raises(AcquireError, match="already holds"):
        write_study(tmp_path, case_id="C", size=16, seed=1)
