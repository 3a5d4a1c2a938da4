"""The synthetic demo cohort: real file formats, the planted gene-image link, determinism."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pydicom
import pytest
import tifffile
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from scipy import stats
from skimage.filters import threshold_otsu

from mgi.acquire import synthetic
from mgi.acquire.synthetic import SyntheticCohortConfig, write_cohort
from mgi.errors import AcquireError, ConfigError
from mgi.expression.gtf import check_gene_model, read_gene_positions

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = SyntheticCohortConfig(n_cases=4, n_genes=80, n_linked_genes=5, slices=6, image_px=32,
                             n_slides=1, slide_px=1024, seed=3)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny cohort shared by the read-only tests."""
    out = tmp_path_factory.mktemp("demo") / "raw"
    assert write_cohort(out, config=TINY) == out / "manifest.tsv"
    return out


def _table(root: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(root / name, sep="\t", dtype=str, keep_default_na=False)


def _star(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", skiprows=1, keep_default_na=False)


def _series(case_dir: Path) -> dict[str, list[Path]]:
    """SeriesDescription -> files of that series (in directory listing order)."""
    found = {}
    for folder in sorted(p for p in case_dir.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.dcm"))
        found[pydicom.dcmread(files[0], stop_before_pixels=True).SeriesDescription] = files
    return found


def _volume(files: list[Path]) -> tuple[np.ndarray, list[int]]:
    """Pixels stacked by ImagePositionPatient z, and the InstanceNumbers in that order."""
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: d.ImagePositionPatient[2])
    return np.stack([d.pixel_array for d in slices]), [int(d.InstanceNumber) for d in slices]


def _masks(root: Path, case_id: str, n: int) -> np.ndarray:
    return np.stack([tifffile.imread(root / "masks" / case_id / f"{case_id}_{k}_mask.tif")
                     for k in range(1, n + 1)])


def _real_sample(relative: str) -> Path:
    root = Path(os.environ.get("MGI_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
    path = root / relative
    if not path.exists():
        pytest.skip(f"real sample {path} not found (set MGI_TEST_DATA to the test data folder)")
    return path


# --- file formats -------------------------------------------------------------------------------


def test_slide_opens_in_openslide_as_aperio_pyramid(cohort: Path) -> None:
    images = _table(cohort, "images.tsv")
    row = images[images.modality == "wsi"].iloc[0]
    slide = openslide.OpenSlide(cohort / row.path)
    assert slide.properties["openslide.vendor"] == "aperio"
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == 0.5
    assert slide.level_count == 3
    assert slide.level_dimensions == ((1024, 1024), (256, 256), (64, 64))
    assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    region = np.asarray(slide.read_region((256, 256), 0, (512, 512)).convert("RGB"))
    assert region.shape == (512, 512, 3) and region.std() > 5  # tissue, not blank
    mask = tifffile.imread(cohort / row.mask_path)
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}


def test_slide_tumour_mask_marks_the_dense_purple_region(cohort: Path) -> None:
    row = _table(cohort, "images.tsv").query("modality == 'wsi'").iloc[0]
    lowest = np.asarray(openslide.OpenSlide(cohort / row.path).read_region((0, 0), 2, (64, 64))
                        .convert("RGB"), dtype=float)
    tumour = tifffile.imread(cohort / row.mask_path) > 0
    background = lowest.mean(axis=2) > 235
    assert lowest[tumour].mean() < lowest[~tumour & ~background].mean() - 10
    assert background.any() and not (background & tumour).any()


def test_slide_file_name_and_manifest_row_follow_gdc(cohort: Path) -> None:
    manifest = _table(cohort, "manifest.tsv")
    slide = manifest[manifest.data_type == "Slide Image"].iloc[0]
    assert slide.filename == f"{slide.case_id}-01Z-00-DX1.{slide.id.upper()}.svs"
    assert slide.path == f"slides/{slide.id}/{slide.filename}"
    assert (slide.state, slide.sample_type) == ("released", "Primary Tumor")


def test_dicom_series_are_mr_ordered_by_position_not_by_file_name(cohort: Path) -> None:
    case_ids = _table(cohort, "clinical.tsv").case_id
    name_order_differs = []
    for case_id in case_ids:
        series = _series(cohort / "radiology" / case_id)
        assert sorted(series) == ["FLAIR", "T1 post", "T1 pre"]
        studies = set()
        for files in series.values():
            assert len(files) == TINY.slices
            datasets = [pydicom.dcmread(f) for f in files]
            for path, ds in zip(files, datasets, strict=True):
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
                assert path.stem == ds.SOPInstanceUID
                assert (ds.Modality, ds.PatientID) == ("MR", case_id)
                assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored) == (32, 32, 16, 12)
                assert ds.pixel_array.dtype == np.uint16 and ds.pixel_array.max() < 4096
                assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
                assert float(ds.ImagePositionPatient[2]) == ds.InstanceNumber * ds.SliceThickness
                studies.add(ds.StudyInstanceUID)
            by_z = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
            assert [d.InstanceNumber for d in by_z] == list(range(1, TINY.slices + 1))
            name_order_differs.append([d.InstanceNumber for d in datasets] != sorted(
                d.InstanceNumber for d in datasets))
        assert len(studies) == 1
    assert any(name_order_differs)  # file names carry no order: readers must sort by position


def test_series_encoding_equals_pydicom_dcmwrite(cohort: Path) -> None:
    path = next((cohort / "radiology").rglob("*.dcm"))
    ds = pydicom.dcmread(path)
    written = io.BytesIO()
    pydicom.dcmwrite(written, ds, enforce_file_format=True)
    assert path.read_bytes() == written.getvalue()


def test_masks_are_lgg_style_and_on_the_dicom_grid(cohort: Path) -> None:
    case_id = _table(cohort, "images.tsv").query("modality == 'mri'").iloc[0].case_id
    files = sorted((cohort / "masks" / case_id).glob("*_mask.tif"))
    assert len(files) == TINY.slices
    mask = tifffile.imread(files[0])
    assert mask.shape == (TINY.image_px, TINY.image_px) and mask.dtype == np.uint8


def test_star_files_have_the_gdc_layout(cohort: Path) -> None:
    manifest = _table(cohort, "manifest.tsv")
    rows = manifest[manifest.data_type == "Gene Expression Quantification"]
    assert len(rows) == TINY.n_cases
    for row in rows.itertuples():
        assert row.path == f"expression/{row.id}/{row.id}.rna_seq.augmented_star_gene_counts.tsv"
        lines = (cohort / row.path).read_text().splitlines()
        assert lines[0] == "# gene-model: GENCODE v36"
        assert lines[1].split("\t") == synthetic.STAR_COLUMNS
        assert len(lines) == 2 + 4 + TINY.n_genes
        for line, name in zip(lines[2:6], synthetic.STAR_SUMMARY_ROWS, strict=True):
            fields = line.split("\t")
            assert fields[0] == name and fields[1:3] == ["", ""] and fields[6:] == ["", "", ""]
            assert all(f.isdigit() for f in fields[3:6])
        table = _star(cohort / row.path).iloc[4:]
        assert table.gene_id.str.fullmatch(r"ENSG\d{11}\.\d+").all()
        assert table.gene_id.is_unique and table.gene_id.is_monotonic_increasing
        assert (table.stranded_first + table.stranded_second == table.unstranded).all()
        assert table.tpm_unstranded.astype(float).sum() == pytest.approx(1e6, rel=1e-4)
    assert (table.gene_type == "protein_coding").mean() > 0.6
    assert (table.unstranded.astype(int) == 0).any()


def test_gtf_places_every_star_gene_and_states_the_same_release(cohort: Path) -> None:
    gtf = cohort / synthetic.GTF_PATH
    positions = read_gene_positions(gtf)
    manifest = _table(cohort, "manifest.tsv")
    star = _star(cohort / manifest.path.iloc[0]).iloc[4:]
    assert sorted(positions["gene_id_version"]) == sorted(star.gene_id)
    by_id = positions.set_index("gene_id_version").loc[star.gene_id]
    assert by_id["gene_name"].tolist() == star.gene_name.tolist()
    assert by_id["gene_type"].tolist() == star.gene_type.tolist()
    assert (positions["end"] > positions["start"]).all()
    assert positions["chromosome"].isin([f"chr{c}" for c in [*range(1, 23), "X", "Y", "M"]]).all()
    check_gene_model(gtf, "GENCODE v36")  # the STAR files' gene-model line
    with gzip.open(gtf, "rt") as handle:
        features = {line.split("\t")[2] for line in handle if not line.startswith("#")}
    assert features == {"gene", "transcript"}
    assert manifest["sample_barcode"].str.fullmatch(r".+-01A").all()


def test_star_header_matches_the_real_gdc_sample(cohort: Path) -> None:
    real = _real_sample("gdc/gdc-rnaseq-tool_test_set_1.final.tsv.gz")
    with gzip.open(real, "rt") as handle:
        real_lines = [next(handle).rstrip("\n") for _ in range(3)]
    path = next((cohort / "expression").rglob("*.tsv"))
    ours = path.read_text().splitlines()[:3]
    assert ours[:2] == real_lines[:2]
    assert ours[2].split("\t")[0] == real_lines[2].split("\t")[0] == "N_unmapped"
    assert [f == "" for f in ours[2].split("\t")] == [f == "" for f in real_lines[2].split("\t")]


def test_normalised_values_follow_the_gdc_formulas(cohort: Path) -> None:
    genes = synthetic._draw_genes(TINY)
    case_id = synthetic._draw_cases(TINY)[0].case_id
    row = _table(cohort, "manifest.tsv").query(f"case_id == {case_id!r}").iloc[0]
    table = _star(cohort / row.path).iloc[4:].reset_index(drop=True)
    counts = table.unstranded.astype(float).to_numpy()
    length = genes.length.to_numpy()
    rpk = counts / length
    np.testing.assert_allclose(table.tpm_unstranded.astype(float), rpk / rpk.sum() * 1e6,
                               atol=1e-4)
    coding = (genes.gene_type == "protein_coding").to_numpy()
    np.testing.assert_allclose(table.fpkm_unstranded.astype(float),
                               counts * 1e9 / (counts[coding].sum() * length), atol=1e-4)


def test_manifest_md5_and_size_match_the_files(cohort: Path) -> None:
    manifest = _table(cohort, "manifest.tsv")
    assert list(manifest.columns) == synthetic.MANIFEST_COLUMNS
    assert len(manifest) == TINY.n_cases + TINY.n_slides
    for row in manifest.itertuples():
        data = (cohort / row.path).read_bytes()
        assert hashlib.md5(data).hexdigest() == row.md5 and len(data) == int(row.size)
        assert Path(row.path).name == row.filename


def test_image_and_side_tables_point_at_written_files(cohort: Path) -> None:
    images = _table(cohort, "images.tsv")
    assert list(images.columns) == ["image_id", "case_id", "modality", "path", "mask_path"]
    assert (images.modality == "mri").sum() == TINY.n_cases
    assert (images.modality == "wsi").sum() == TINY.n_slides
    for row in images.itertuples():
        assert (cohort / row.path).exists() and (cohort / row.mask_path).exists()
    clinical = _table(cohort, "clinical.tsv")
    assert list(clinical.columns) == ["case_id", "project_id", "gender", "age_at_diagnosis"]
    assert (clinical.project_id == "DEMO-SYN").all()
    assert clinical.age_at_diagnosis.astype(int).between(20 * 365, 76 * 365).all()
    genes = _table(cohort, "synthetic_genes.tsv")
    assert sorted(genes.program.value_counts().items()) == [
        ("burden", 5), ("location", 5), ("subtype", 5)]
    assert genes.gene_name.str.fullmatch(r"(SUBTYPE|BURDEN|LOCATION)_G\d{2}").all()


# --- the planted link ---------------------------------------------------------------------------


def _log_expression(root: Path, program: str) -> pd.Series:
    """Mean log2(TPM + 1) of a planted program per case."""
    genes = set(_table(root, "synthetic_genes.tsv").query("program == @program").gene_id)
    manifest = _table(root, "manifest.tsv").query("data_type == 'Gene Expression Quantification'")
    values = {}
    for row in manifest.itertuples():
        table = _star(root / row.path).iloc[4:]
        tpm = table.loc[table.gene_id.isin(genes), "tpm_unstranded"].astype(float)
        values[row.case_id] = np.log2(tpm + 1).mean()
    return pd.Series(values)


def test_subtype_genes_are_higher_in_subtype_1(cohort: Path) -> None:
    truth = _table(cohort, "synthetic_truth.tsv").set_index("case_id")
    assert sorted(truth.subtype.astype(int)) == [0, 0, 1, 1]
    level = _log_expression(cohort, "subtype")
    subtype = truth.subtype.astype(int).reindex(level.index)
    assert level[subtype == 1].min() > level[subtype == 0].max() + 1


@pytest.mark.parametrize("program", ["burden", "location"])
def test_continuous_program_genes_follow_their_trait(tmp_path: Path, program: str) -> None:
    config = replace(TINY, n_cases=12, slices=3, n_slides=0, n_genes=60)
    write_cohort(tmp_path / "raw", config=config)
    truth = _table(tmp_path / "raw", "synthetic_truth.tsv").set_index("case_id")
    level = _log_expression(tmp_path / "raw", program)
    trait = truth[program].astype(float).reindex(level.index)
    assert stats.spearmanr(trait, level).statistic > 0.6


def test_tumour_mask_covers_middle_slices_only(cohort: Path) -> None:
    for case_id in _table(cohort, "clinical.tsv").case_id:
        tumour = _masks(cohort, case_id, TINY.slices) > 0
        per_slice = tumour.sum(axis=(1, 2))
        assert per_slice[0] == 0 and per_slice[-1] == 0
        assert (per_slice[1:-1] > 0).all()
        assert set(np.unique(_masks(cohort, case_id, TINY.slices))) == {0, 255}


def test_tumour_row_follows_location(cohort: Path) -> None:
    truth = _table(cohort, "synthetic_truth.tsv")
    px = TINY.image_px
    for case in truth.itertuples():
        rows = np.nonzero(_masks(cohort, case.case_id, TINY.slices))[1]
        expected = (px - 1) / 2 + (float(case.location) - 0.5) * 0.3 * px
        assert abs(rows.mean() - expected) <= 1.0, case.case_id


def test_flair_contrast_of_tumour_follows_subtype_and_mimic_is_opposite(cohort: Path) -> None:
    truth = _table(cohort, "synthetic_truth.tsv").set_index("case_id")
    for case_id, row in truth.iterrows():
        flair, _ = _volume(_series(cohort / "radiology" / case_id)["FLAIR"])
        tumour = _masks(cohort, case_id, TINY.slices) > 0
        mimic = tumour[:, :, ::-1]  # mirrored across the midline
        assert not (tumour & mimic).any()
        brain = flair > threshold_otsu(flair)
        sign = 1 if row.subtype == "1" else -1
        assert sign * (flair[tumour].mean() - flair[brain].mean()) > 50
        assert sign * (flair[mimic].mean() - flair[brain].mean()) < -50
        tumour_columns = np.nonzero(tumour.any(axis=(0, 1)))[0]
        assert (tumour_columns.mean() > TINY.image_px / 2) == (row.tumour_side == "left")


# --- determinism, replacement, validation -------------------------------------------------------


def _fingerprint(root: Path) -> dict[str, bytes]:
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
             if p.is_file()}
    pixels = {name: pydicom.dcmread(io.BytesIO(data)).PixelData
              for name, data in files.items() if name.endswith(".dcm")}
    return {**files, **{f"{name}#pixels": data for name, data in pixels.items()}}


def test_same_seed_gives_identical_bytes(cohort: Path, tmp_path: Path) -> None:
    again = write_cohort(tmp_path / "raw", config=TINY).parent
    assert _fingerprint(again) == _fingerprint(cohort)


def test_different_seed_gives_different_files(cohort: Path, tmp_path: Path) -> None:
    other = write_cohort(tmp_path / "raw", config=replace(TINY, seed=4)).parent
    ours, theirs = _fingerprint(cohort), _fingerprint(other)
    assert ours["manifest.tsv"] != theirs["manifest.tsv"]
    assert not set(ours) & {k for k in theirs if k.endswith(".dcm")}  # new UIDs everywhere
    first_star = next(k for k in ours if k.endswith(".tsv") and k.startswith("expression/"))
    assert first_star not in theirs


def test_rewrite_replaces_the_previous_cohort(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    small = replace(TINY, n_cases=2, slices=3, n_slides=0)
    write_cohort(out, config=small)
    write_cohort(out, config=replace(small, seed=9))
    for case_dir in (out / "radiology").iterdir():
        assert len(list(case_dir.iterdir())) == 3  # no stale series from the first write
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]  # no staging folders left
    # the layout the synthesize rule declares, slides/ included, holds without slides too
    assert (out / "slides").is_dir() and not any((out / "slides").iterdir())


def test_refuses_to_replace_a_folder_that_is_not_a_cohort(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(AcquireError, match=r"no manifest\.tsv"):
        write_cohort(out, config=replace(TINY, n_cases=2, slices=3, n_slides=0))
    assert (out / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_a_folder_of_empty_output_folders_is_replaced(tmp_path: Path) -> None:
    """Snakemake makes the parent folder of each output (reference/) before the job runs."""
    out = tmp_path / "raw"
    (out / "reference").mkdir(parents=True)
    write_cohort(out, config=replace(TINY, n_cases=2, slices=3, n_slides=0))
    assert (out / "manifest.tsv").is_file() and (out / synthetic.GTF_PATH).is_file()


@pytest.mark.parametrize(("field", "value"), [
    ("n_cases", 1), ("n_genes", 10), ("slices", 2), ("image_px", 16), ("n_slides", 9),
    ("slide_px", 1000), ("seed", -1),
])
def test_invalid_config_names_the_field(tmp_path: Path, field: str, value: int) -> None:
    with pytest.raises(ConfigError, match=field):
        write_cohort(tmp_path / "raw", config=replace(TINY, **{field: value}))
    assert not (tmp_path / "raw").exists()
