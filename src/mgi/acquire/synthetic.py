"""Embedded demo cohort: writes `data/{cohort}/raw/` in the formats the real sources deliver.

Every later stage runs the same readers on the demo cohort and on real data, so the files here
copy the real layouts: GDC augmented STAR gene counts and Aperio SVS slides listed in a
gdc-client manifest, TCIA/NBIA-style DICOM MR series (one folder per series, files named by
their SOPInstanceUID, so slice order must come from ImagePositionPatient), and LGG-style
per-slice tumour masks (`{case_id}_{InstanceNumber}_mask.tif`, uint8 0/255).

The planted link (what makes the genes measurably useful for the images):

* Each case has a subtype `s` (0/1, exactly half each, up to one for odd counts, after a seeded
  shuffle), a tumour burden `b ~ U(0.15, 1)` and a location `l ~ U(0, 1)`; all three are in
  `synthetic_truth.tsv`.
* Expression: counts are negative-binomial per gene. Program "subtype" (`SUBTYPE_G01`..,
  protein-coding) has its mean multiplied by `2**2.5` when `s = 1`; program "burden"
  (`BURDEN_G01`..) has log2 fold change `5 * b` and program "location" (`LOCATION_G01`..)
  `5 * l`. The planted genes are in `synthetic_genes.tsv`. Burden and location are what the
  genes and the images share (what contrastive pre-training can align): with burden alone, even
  an oracle that knew the planted genes and the true tumour areas matched only 3 of 8 held-out
  demo patients.
* MRI (T1 pre, FLAIR, T1 post; co-registered, same geometry): the brain is an ellipse of smooth
  textured tissue whose size shrinks slightly towards the outer slices. The tumour is an
  ellipsoid over the central ~60% of slices (outer slices have empty masks) in one hemisphere,
  in-plane radius growing linearly with `b` from 3 px to `image_px / 5` at the centre slice,
  its row moving with `l` from 15% of the image above the centre (`l = 0`) to 15% below.
  On T1 pre and FLAIR it is hyperintense when `s = 1` and hypointense when `s = 0` (by 30% of
  the tissue level, about 3 tissue SDs). A "mimic" of the same size and the opposite contrast
  sits mirrored in the other hemisphere and is not in the mask, so the image alone cannot say
  which blob is the tumour; the subtype genes can. On T1 post both blobs' rims enhance alike.
  Rician noise; uint16 stored values in 0..~1500, RescaleSlope 1, RescaleIntercept 0.
* Slides (first `n_slides` cases): H&E-like white background, pink tissue of irregular shape,
  purple nuclei, and a denser, darker tumour region inside the tissue whose annotation is
  `masks/slides/{file_id}_mask.tif` at downsample 16 (the size of the last pyramid level).

Coordinates: volume arrays are indexed [slice, row, column]; with ImageOrientationPatient
[1,0,0,0,1,0] a higher column is further towards the patient's left (+x in LPS), so
`tumour_side` "left" in the truth table means the tumour sits at columns above the midline.
`age_at_diagnosis` in `clinical.tsv` is in days, as in the GDC data model.

Determinism: the same config writes the same bytes. Every random draw comes from a numpy
Generator seeded by (seed, stream, index); UUIDs are built from those draws and DICOM UIDs from
`pydicom.uid.generate_uid` with the seed and the config as entropy; no timestamps are embedded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import tifffile
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, MRImageStorage
from scipy import ndimage

from mgi.errors import AcquireError, ConfigError
from mgi.io import write_tsv
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import SyntheticOptions, default_of
from mgi.progress import progress

log = logging.getLogger(__name__)

PROJECT_ID = "DEMO-SYN"
SAMPLE_TYPE = "Primary Tumor"
EXPRESSION_DATA_TYPE = "Gene Expression Quantification"
SLIDE_DATA_TYPE = "Slide Image"
STAR_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
GENE_MODEL_LINE = "# gene-model: GENCODE v36"
STAR_COLUMNS = [
    "gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
    "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded",
]
STAR_SUMMARY_ROWS = ["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"]
MANIFEST_COLUMNS = [
    "id", "filename", "md5", "size", "state", "case_id", "data_type", "sample_type", "path",
    "sample_barcode",
]
SERIES_DESCRIPTIONS = ("T1 pre", "FLAIR", "T1 post")
# planted program -> log2 fold change per unit of the case's trait of the same name
PROGRAM_LOG2FC = {"subtype": 2.5, "burden": 5.0, "location": 5.0}
PROGRAMS = tuple(PROGRAM_LOG2FC)
SLIDE_DOWNSAMPLES = (1, 4, 16)
SLIDE_TILE = 256
SLIDE_MPP = 0.5
SLIDE_JPEG_QUALITY = 80
MR_FOV_MM = 240.0
MR_SLICE_MM = 5.0

# GDC's augment_star_counts (gdc-rnaseq-tool) writes the released files with '%.4f'; its old
# test fixture in MGI_TEST_DATA shows full repr floats. Readers must accept both.
_FLOAT_FORMAT = "%.4f"
_GENE_TYPES = {  # biotype: (share, gene-name prefix)
    "protein_coding": (0.75, "PCG"),
    "lncRNA": (0.12, "LINC"),
    "processed_pseudogene": (0.05, "PSG"),
    "unprocessed_pseudogene": (0.02, "UPSG"),
    "misc_RNA": (0.02, "Y_RNA"),
    "snRNA": (0.02, "RNU"),
    "miRNA": (0.01, "MIR"),
    "transcribed_unprocessed_pseudogene": (0.01, "TUPSG"),
}
_SMALL_RNA_TYPES = {"misc_RNA", "snRNA", "miRNA"}
_CHROMOSOMES = [f"chr{i}" for i in range(1, 23)] + ["chrX", "chrY", "chrM"]
_STREAMS = {"cases": 1, "ids": 2, "genes": 3, "expression": 4, "mri": 5, "slide": 6,
            "positions": 7}
GTF_PATH = "reference/gencode.annotation.gtf.gz"  # the workflow's GENE_ANNOTATION
_GTF_HEADER = (
    "##description: synthetic annotation of the mgi demo genes, modelled on GENCODE "
    "version 36 (Ensembl 102)\n##provider: mgi.acquire.synthetic\n##format: gtf\n"
)
# per-sequence tissue level and texture weight; tumour contrast is a share of the tissue level
_MR_TISSUE = {"T1 pre": (520.0, 0.07), "FLAIR": (430.0, 0.09), "T1 post": (560.0, 0.07)}
_MR_CONTRAST = 0.30
_MR_RIM_ENHANCEMENT = 0.25
_MR_NOISE_SD = 12.0
# the elements `_set_slice` changes, in ascending tag order (see `_encode_slice`)
_SLICE_TAGS = [Tag(name) for name in ("SOPInstanceUID", "InstanceNumber", "ImagePositionPatient",
                                      "SliceLocation", "PixelData")]
_MR_SEQUENCE_PARAMS = {  # ScanningSequence, SequenceVariant, TR, TE, TI
    "T1 pre": ("SE", "SP", 500.0, 12.0, None),
    "FLAIR": ("IR", "SK\\SP\\MP", 9000.0, 120.0, 2500.0),
    "T1 post": ("SE", "SP", 500.0, 12.0, None),
}


@dataclass(frozen=True)
class SyntheticCohortConfig(SyntheticOptions):
    """Size (the config's `synthetic` section) and seed of the synthetic demo cohort."""

    seed: int = default_of("seed")


@dataclass(frozen=True)
class _Case:
    index: int
    case_id: str
    subtype: int
    burden: float
    location: float  # 0..1: the lesions' row, from anterior (0) to posterior (1)
    side: int  # +1: tumour at columns above the midline (patient left), -1: below
    gender: str
    age_days: int
    expression_file_id: str
    slide_file_id: str


def write_cohort(out_dir: Path, *, config: SyntheticCohortConfig) -> Path:
    """Write a synthetic cohort under out_dir (= data/{cohort}/raw); return the manifest path."""
    _validate(config)
    out_dir = Path(out_dir)
    staging = _staging_dir(out_dir)
    try:
        _write_all(staging, config)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote synthetic cohort (%d cases) to %s", config.n_cases, out_dir)
    return out_dir / "manifest.tsv"


# --- orchestration ------------------------------------------------------------------------------


def _validate(config: SyntheticCohortConfig) -> None:
    checks = [
        ("n_cases", config.n_cases >= 2, "at least 2"),
        ("n_linked_genes", config.n_linked_genes >= 1, "at least 1"),
        ("n_genes", config.n_genes >= len(PROGRAMS) * config.n_linked_genes + 4,
         f"at least {len(PROGRAMS)} * n_linked_genes + 4 = "
         f"{len(PROGRAMS) * config.n_linked_genes + 4}"),
        ("n_genes", config.n_genes <= 200_000, "at most 200000"),
        ("slices", config.slices >= 3, "at least 3 (outer slices stay tumour-free)"),
        ("image_px", config.image_px >= 32, "at least 32"),
        ("n_slides", 0 <= config.n_slides <= config.n_cases, "between 0 and n_cases"),
        ("slide_px", config.slide_px >= 256 and config.slide_px % 16 == 0,
         "a multiple of 16, at least 256"),
        ("seed", config.seed >= 0, "a non-negative integer"),
    ]
    for field, ok, expected in checks:
        if not ok:
            value = getattr(config, field)
            raise ConfigError(f"synthetic cohort config: {field}={value!r}, expected {expected}")


def _staging_dir(out_dir: Path) -> Path:
    # The whole cohort is written into a sibling folder and renamed into place, so a reader
    # never sees half a cohort and a rewrite never mixes old and new DICOM series.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial",
                                    dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise AcquireError(f"{out_dir}: exists and is not a folder; expected a cohort raw folder")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(staging, out_dir)
        return
    # Snakemake makes the parent folders of a rule's outputs (e.g. reference/) before the job.
    only_empty_dirs = all(p.is_dir() for p in out_dir.rglob("*"))
    if not (out_dir / "manifest.tsv").exists() and not only_empty_dirs:
        raise AcquireError(
            f"{out_dir}: folder is not empty and has no manifest.tsv; refusing to replace "
            "something that is not a cohort"
        )
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, old)  # rename onto the empty temp folder
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_all(root: Path, config: SyntheticCohortConfig) -> None:
    cases = _draw_cases(config)
    genes = _draw_genes(config)
    manifest, images = [], []
    for case in progress(cases, desc="synthetic cases", unit="case"):
        manifest.append(_write_expression(root, case, genes, config))
        images.append(_write_radiology(root, case, config))
    (root / "slides").mkdir(exist_ok=True)  # the layout is the same without slides (n_slides 0)
    for case in progress(cases[: config.n_slides], desc="synthetic slides", unit="slide"):
        row, image = _write_slide(root, case, config)
        manifest.append(row)
        images.append(image)
    write_tsv(pd.DataFrame(manifest, columns=MANIFEST_COLUMNS), root / "manifest.tsv")
    write_tsv(pd.DataFrame(images, columns=IMAGE_TABLE_COLUMNS), root / "images.tsv")
    write_tsv(_clinical_table(cases), root / "clinical.tsv")
    write_tsv(_truth_table(cases), root / "synthetic_truth.tsv")
    planted = genes.loc[genes.program != "", ["gene_id", "gene_name", "program"]]
    planted = planted.sort_values(["program", "gene_name"], ascending=[False, True])
    write_tsv(planted, root / "synthetic_genes.tsv")
    _write_gtf(root / GTF_PATH, genes, config)


def _write_gtf(path: Path, genes: pd.DataFrame, config: SyntheticCohortConfig) -> None:
    """A GENCODE-style GTF of the demo genes: a gene and a transcript record each, by position."""
    rng = _rng(config, "positions")
    start = rng.integers(10_000, 150_000_000, len(genes))
    span = (genes["length"].to_numpy() * rng.uniform(2.0, 20.0, len(genes))).astype(int)
    strand = rng.choice(["+", "-"], size=len(genes))
    table = genes.assign(start=start, end=start + span, strand=strand)
    table = table.assign(_rank=[_CHROMOSOMES.index(c) for c in table.chromosome])
    lines = [_GTF_HEADER]
    for g in table.sort_values(["_rank", "start"]).itertuples():
        attrs = f'gene_id "{g.gene_id}"; gene_type "{g.gene_type}"; gene_name "{g.gene_name}";'
        for feature, extra in (("gene", ""), ("transcript", f' transcript_id "{g.gene_id}-T1";')):
            lines.append(f"{g.chromosome}\tMGI\t{feature}\t{g.start}\t{g.end}\t.\t{g.strand}"
                         f"\t.\t{attrs}{extra} level 2;\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(lines).encode(), mtime=0))


def _rng(config: SyntheticCohortConfig, stream: str, index: int = 0) -> np.random.Generator:
    """Independent generator per (seed, stream, index): one part's size never shifts another's."""
    return np.random.default_rng([config.seed, _STREAMS[stream], index])


def _uuid4(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _md5_row(root: Path, path: Path, file_id: str, case_id: str, data_type: str) -> dict:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {
        "id": file_id, "filename": path.name, "md5": digest.hexdigest(),
        "size": path.stat().st_size, "state": "released", "case_id": case_id,
        "data_type": data_type, "sample_type": SAMPLE_TYPE,
        "sample_barcode": f"{case_id}-01A",
        "path": path.relative_to(root).as_posix(),
    }


# --- cases and tables ---------------------------------------------------------------------------


def _draw_cases(config: SyntheticCohortConfig) -> list[_Case]:
    rng = _rng(config, "cases")
    n = config.n_cases
    subtypes = np.arange(n) % 2
    rng.shuffle(subtypes)
    burden = rng.uniform(0.15, 1.0, n)
    side = rng.choice([-1, 1], n)
    location = rng.uniform(0.0, 1.0, n)
    gender = rng.choice(["female", "male"], n)
    age_days = np.round(rng.uniform(20.0, 75.0, n) * 365.25).astype(int)
    ids = _rng(config, "ids")
    return [
        _Case(
            index=i, case_id=f"DEMO-SY-{i + 1:04d}", subtype=int(subtypes[i]),
            burden=round(float(burden[i]), 4), location=round(float(location[i]), 4),
            side=int(side[i]), gender=str(gender[i]),
            age_days=int(age_days[i]), expression_file_id=_uuid4(ids), slide_file_id=_uuid4(ids),
        )
        for i in range(n)
    ]


def _clinical_table(cases: list[_Case]) -> pd.DataFrame:
    return pd.DataFrame({
        "case_id": [c.case_id for c in cases],
        "project_id": PROJECT_ID,
        "gender": [c.gender for c in cases],
        "age_at_diagnosis": [c.age_days for c in cases],
    })


def _truth_table(cases: list[_Case]) -> pd.DataFrame:
    return pd.DataFrame({
        "case_id": [c.case_id for c in cases],
        "subtype": [c.subtype for c in cases],
        "burden": [c.burden for c in cases],
        "location": [c.location for c in cases],
        "tumour_side": ["left" if c.side > 0 else "right" for c in cases],
    })


# --- expression (GDC augmented STAR gene counts) ------------------------------------------------


def _draw_genes(config: SyntheticCohortConfig) -> pd.DataFrame:
    """Gene table: id, name, biotype, chromosome, exon length, NB mean and dispersion, program."""
    rng = _rng(config, "genes")
    n, k = config.n_genes, config.n_linked_genes
    numbers = np.sort(rng.choice(np.arange(3, 300_000), size=n, replace=False))
    versions = rng.integers(1, 21, n)
    types = list(_GENE_TYPES)
    shares = np.array([_GENE_TYPES[t][0] for t in types])
    gene_type = rng.choice(types, size=n, p=shares / shares.sum()).astype(object)
    chrom_weights = np.r_[np.linspace(2.0, 0.6, 22), 0.8, 0.1, 0.02]
    chromosome = rng.choice(_CHROMOSOMES, size=n, p=chrom_weights / chrom_weights.sum())
    program = np.full(n, "", dtype=object)
    names = np.array(
        [f"{_GENE_TYPES[t][1]}{i + 1:04d}" for i, t in enumerate(gene_type)], dtype=object
    )
    planted = rng.choice(n, size=len(PROGRAMS) * k, replace=False)
    width = max(2, len(str(k)))
    for number, label in enumerate(PROGRAMS):
        idx = planted[number * k:(number + 1) * k]
        program[idx] = label
        names[idx] = [f"{label.upper()}_G{m + 1:0{width}d}" for m in range(k)]
        gene_type[idx] = "protein_coding"
        chromosome[idx] = rng.choice(_CHROMOSOMES[:22], size=k)
    frame = pd.DataFrame({
        "gene_id": [f"ENSG{num:011d}.{ver}" for num, ver in zip(numbers, versions, strict=True)],
        "gene_name": names, "gene_type": gene_type, "chromosome": chromosome, "program": program,
    })
    frame["length"] = _draw_lengths(rng, frame.gene_type.to_numpy())
    frame["mean"], frame["dispersion"] = _draw_nb_parameters(rng, frame)
    return frame


def _draw_lengths(rng: np.random.Generator, gene_type: np.ndarray) -> np.ndarray:
    """Union exon lengths (bp): long for coding genes, short for small RNAs."""
    median = np.select(
        [gene_type == "protein_coding", gene_type == "lncRNA"], [3000.0, 1500.0], 900.0
    )
    lengths = rng.lognormal(np.log(median), 0.6)
    small = np.isin(gene_type, list(_SMALL_RNA_TYPES))
    lengths[small] = rng.uniform(60, 350, small.sum())
    return np.maximum(lengths, 50).astype(int)


def _draw_nb_parameters(
    rng: np.random.Generator, genes: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene NB mean (wide spread: many genes near zero) and dispersion (var = mu + a mu^2)."""
    coding = genes.gene_type.to_numpy() == "protein_coding"
    planted = genes.program.to_numpy() != ""
    mean = np.where(coding, rng.lognormal(np.log(150.0), 1.6, len(genes)),
                    rng.lognormal(np.log(4.0), 1.8, len(genes)))
    mean[planted] = rng.lognormal(np.log(200.0), 0.6, planted.sum())
    dispersion = rng.lognormal(np.log(0.25), 0.5, len(genes))
    dispersion[planted] = rng.lognormal(np.log(0.15), 0.3, planted.sum())
    return mean, dispersion


def _case_counts(
    rng: np.random.Generator, genes: pd.DataFrame, case: _Case
) -> np.ndarray:
    """Unstranded NB counts of one case, with the planted programs applied to the means."""
    log2fc = np.zeros(len(genes))
    program = genes.program.to_numpy()
    for label, fold_change in PROGRAM_LOG2FC.items():
        log2fc[program == label] = fold_change * getattr(case, label)
    size_factor = rng.lognormal(0.0, 0.25)
    mu = genes["mean"].to_numpy() * np.exp2(log2fc) * size_factor
    shape = 1.0 / genes["dispersion"].to_numpy()
    return rng.negative_binomial(shape, shape / (shape + mu))


def _normalised(counts: np.ndarray, genes: pd.DataFrame) -> dict[str, np.ndarray]:
    """TPM, FPKM and FPKM-UQ as GDC's augment_star_counts computes them."""
    c = counts.astype(float)
    length = genes["length"].to_numpy(dtype=float)
    coding = genes.gene_type.to_numpy() == "protein_coding"
    autosomal = coding & ~genes.chromosome.isin(["chrX", "chrY", "chrM"]).to_numpy()
    rpk = c * 1e3 / length
    tpm = rpk * 1e6 / max(rpk.sum(), 1e-12)
    fpkm = c * 1e9 / (max(c[coding].sum(), 1.0) * length)
    nonzero = c[autosomal & (c > 0)]
    upper_quartile = np.quantile(nonzero, 0.75) if nonzero.size else 1.0
    fpkm_uq = c * 1e9 / (upper_quartile * max(autosomal.sum(), 1) * length)
    return {"tpm_unstranded": tpm, "fpkm_unstranded": fpkm, "fpkm_uq_unstranded": fpkm_uq}


def _summary_rows(rng: np.random.Generator, first: np.ndarray, second: np.ndarray) -> list[list]:
    """The 4 STAR N_* rows: unmapped and multimapping equal across columns, as STAR reports."""
    total = int(first.sum() + second.sum())
    unmapped = int(total * rng.uniform(0.01, 0.04))
    multi = int(total * rng.uniform(0.05, 0.12))
    no_feature = int(total * rng.uniform(0.04, 0.10))
    ambiguous = int(total * rng.uniform(0.02, 0.05))
    return [
        ["N_unmapped", unmapped, unmapped, unmapped],
        ["N_multimapping", multi, multi, multi],
        ["N_noFeature", no_feature, no_feature + int(second.sum()),
         no_feature + int(first.sum())],
        ["N_ambiguous", ambiguous, ambiguous // 40, ambiguous // 40],
    ]


def _star_table(rng: np.random.Generator, genes: pd.DataFrame, case: _Case) -> pd.DataFrame:
    counts = _case_counts(rng, genes, case)
    first = rng.binomial(counts, 0.5)
    second = counts - first
    body = pd.DataFrame({
        "gene_id": genes.gene_id, "gene_name": genes.gene_name, "gene_type": genes.gene_type,
        "unstranded": counts, "stranded_first": first, "stranded_second": second,
        **_normalised(counts, genes),
    })
    head = pd.DataFrame(_summary_rows(rng, first, second),
                        columns=["gene_id", "unstranded", "stranded_first", "stranded_second"])
    return pd.concat([head, body], ignore_index=True)[STAR_COLUMNS]


def _write_expression(root: Path, case: _Case, genes: pd.DataFrame,
                      config: SyntheticCohortConfig) -> dict:
    table = _star_table(_rng(config, "expression", case.index), genes, case)
    buffer = io.StringIO()
    buffer.write(GENE_MODEL_LINE + "\n")
    table.to_csv(buffer, sep="\t", index=False, float_format=_FLOAT_FORMAT, lineterminator="\n")
    file_id = case.expression_file_id
    path = root / "expression" / file_id / f"{file_id}{STAR_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue().encode())
    return _md5_row(root, path, file_id, case.case_id, EXPRESSION_DATA_TYPE)


# --- radiology (TCIA-style DICOM MR) and LGG-style masks ----------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...],
                  sigma: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit SD (float32)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / max(float(field.std()), 1e-6)


def _mr_geometry(config: SyntheticCohortConfig) -> dict[str, np.ndarray]:
    """Brain ellipse (shrinking towards the outer slices) and pixel grids, [slice, row, col]."""
    n_slices, px = config.slices, config.image_px
    z = np.arange(n_slices, dtype=np.float32)[:, None, None]
    y = np.arange(px, dtype=np.float32)[None, :, None]
    x = np.arange(px, dtype=np.float32)[None, None, :]
    centre = (px - 1) / 2
    zn = (z - (n_slices - 1) / 2) / ((n_slices - 1) / 2)
    scale = np.sqrt(1.0 - 0.35 * zn**2)
    brain = ((x - centre) / (0.44 * px * scale)) ** 2 + ((y - centre) / (0.46 * px * scale)) ** 2
    return {"z": z, "y": y, "x": x, "brain": brain <= 1.0}


def _blob(geometry: dict, cz: float, cy: int, cx: int, radius: float, rz: float) -> np.ndarray:
    """Normalised ellipsoid radius (1 on the surface) around (cz, cy, cx)."""
    return np.sqrt(((geometry["x"] - cx) / radius) ** 2 + ((geometry["y"] - cy) / radius) ** 2
                   + ((geometry["z"] - cz) / rz) ** 2)


def _mri_case(case: _Case, config: SyntheticCohortConfig) -> tuple[dict[str, np.ndarray],
                                                                   np.ndarray]:
    """Stored-value volumes per series description and the tumour mask, [slice, row, col]."""
    rng = _rng(config, "mri", case.index)
    n_slices, px = config.slices, config.image_px
    geometry = _mr_geometry(config)
    brain = geometry["brain"]
    radius = 3.0 + (px / 5 - 3.0) * (case.burden - 0.15) / 0.85
    offset = max(radius + 1.0 + round(0.02 * px), 0.2 * px)  # tumour and mimic never touch
    centre = (px - 1) / 2
    tumour_x = round(centre + case.side * offset)
    mimic_x = px - 1 - tumour_x  # mirrored across the midline
    row = round(centre + (case.location - 0.5) * 0.3 * px)
    cz, rz = (n_slices - 1) / 2, 0.3 * n_slices
    rho_tumour = _blob(geometry, cz, row, tumour_x, radius, rz)
    rho_mimic = _blob(geometry, cz, row, mimic_x, radius, rz)
    mask = (rho_tumour <= 1.0) & brain
    # partial-volume edges (~1 px) and a ~1 px rim for the T1 post enhancement
    fill_tumour = np.clip((1.0 - rho_tumour) * radius + 0.5, 0, 1) * brain
    fill_mimic = np.clip((1.0 - rho_mimic) * radius + 0.5, 0, 1) * brain
    rims = (np.exp(-0.5 * ((rho_tumour - 1.0) * radius) ** 2)
            + np.exp(-0.5 * ((rho_mimic - 1.0) * radius) ** 2)) * brain
    sign = 1.0 if case.subtype == 1 else -1.0
    shared = _smooth_noise(rng, brain.shape, (0.8, px / 24, px / 24))
    volumes = {}
    for description in SERIES_DESCRIPTIONS:
        level, texture = _MR_TISSUE[description]
        own = _smooth_noise(rng, brain.shape, (0.8, px / 32, px / 32))
        tissue = level * (1.0 + texture * (0.8 * shared + 0.6 * own))
        lesion = sign * _MR_CONTRAST * level * (fill_tumour - fill_mimic)
        signal = (tissue + lesion) * brain
        if description == "T1 post":
            signal = signal + _MR_RIM_ENHANCEMENT * level * rims
        volumes[description] = _rician(rng, signal)
    return volumes, mask


def _rician(rng: np.random.Generator, signal: np.ndarray) -> np.ndarray:
    """Magnitude of signal plus complex Gaussian noise, as uint16 (12-bit range)."""
    real = signal + rng.normal(0.0, _MR_NOISE_SD, signal.shape)
    imag = rng.normal(0.0, _MR_NOISE_SD, signal.shape)
    return np.clip(np.rint(np.hypot(real, imag)), 0, 4095).astype(np.uint16)


def _uid(config: SyntheticCohortConfig, *parts: object) -> str:
    entropy = ["mgi-synthetic", str(config.seed), repr(config), *map(str, parts)]
    return str(pydicom.uid.generate_uid(entropy_srcs=entropy))


def _mr_series(first_slice: np.ndarray, *, case: _Case, description: str,
               uids: dict[str, str], config: SyntheticCohortConfig) -> Dataset:
    """MR Image Storage object (explicit VR little endian) of the series' first axial slice.

    The other slices reuse it through `_set_slice`: building ~50 elements per file would
    dominate the cohort's write time.
    """
    spacing = round(MR_FOV_MM / config.image_px, 6)
    origin = round(-spacing * config.image_px / 2, 4)
    scanning, variant, tr, te, ti = _MR_SEQUENCE_PARAMS[description]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.Manufacturer = "MGI synthetic"
    ds.StudyDescription = "MRI BRAIN"
    ds.SeriesDescription = description
    ds.PatientName = case.case_id
    ds.PatientID = case.case_id
    ds.PatientSex = case.gender[0].upper()
    ds.BodyPartExamined = "BRAIN"
    ds.ScanningSequence = scanning
    ds.SequenceVariant = variant.split("\\")
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = MR_SLICE_MM
    ds.RepetitionTime = tr
    ds.EchoTime = te
    if ti is not None:
        ds.InversionTime = ti
    ds.MagneticFieldStrength = 1.5
    ds.SpacingBetweenSlices = MR_SLICE_MM
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.StudyID = "1"
    ds.SeriesNumber = SERIES_DESCRIPTIONS.index(description) + 1
    ds.ImagePositionPatient = [origin, origin, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [spacing, spacing]
    ds.WindowCenter = 600
    ds.WindowWidth = 1200
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.set_pixel_data(first_slice, "MONOCHROME2", 12, generate_instance_uid=False)
    return ds


def _set_slice(ds: Dataset, pixels: np.ndarray, *, instance: int, sop: str) -> None:
    """Point the series dataset at slice `instance` (1-based; z = instance * thickness)."""
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPInstanceUID = sop
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], instance * MR_SLICE_MM]
    ds.SliceLocation = instance * MR_SLICE_MM
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()


def _slice_chunks(ds: Dataset) -> list[bytes]:
    """The series' elements that no slice changes, encoded once, split around the slice tags."""
    bounds = [-1, *(int(tag) for tag in _SLICE_TAGS), 1 << 32]
    chunks = []
    for low, high in itertools.pairwise(bounds):
        part = Dataset()
        for element in ds:
            if low < int(element.tag) < high:
                part.add(element)
        chunks.append(_encode(lambda fp, part=part: write_dataset(fp, part)))
    return chunks


def _encode(write: Callable[[DicomBytesIO], object]) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write(fp)
    return fp.getvalue()


def _encode_slice(ds: Dataset, chunks: list[bytes]) -> bytes:
    """The Part 10 file of the current slice: what dcmwrite gives, encoding ~10 elements not ~50.

    Written by hand around pydicom's own element encoders because per-element encoding of the
    whole dataset for every slice dominated the cohort's write time (~5x slower).
    """
    parts = [b"\0" * 128 + b"DICM",
             _encode(lambda fp: write_file_meta_info(fp, ds.file_meta, enforce_standard=True))]
    for chunk, tag in zip(chunks, [*_SLICE_TAGS, None], strict=True):
        parts.append(chunk)
        if tag is not None:
            parts.append(_encode(lambda fp, tag=tag: write_data_element(fp, ds[tag])))
    return b"".join(parts)


def _write_radiology(root: Path, case: _Case, config: SyntheticCohortConfig) -> dict:
    volumes, mask = _mri_case(case, config)
    study = {"study": _uid(config, case.case_id, "study"),
             "frame": _uid(config, case.case_id, "frame")}
    case_dir = root / "radiology" / case.case_id
    for description, volume in volumes.items():
        series = _uid(config, case.case_id, "series", description)
        (case_dir / series).mkdir(parents=True)
        ds = _mr_series(volume[0], case=case, description=description,
                        uids={**study, "series": series}, config=config)
        chunks = _slice_chunks(ds)
        for k, pixels in enumerate(volume):
            sop = _uid(config, case.case_id, description, k + 1)
            _set_slice(ds, pixels, instance=k + 1, sop=sop)
            (case_dir / series / f"{sop}.dcm").write_bytes(_encode_slice(ds, chunks))
    mask_dir = root / "masks" / case.case_id
    mask_dir.mkdir(parents=True)
    for k, plane in enumerate(mask):
        tifffile.imwrite(mask_dir / f"{case.case_id}_{k + 1}_mask.tif",
                         plane.astype(np.uint8) * 255, photometric="minisblack", metadata=None)
    return {"image_id": case.case_id, "case_id": case.case_id, "modality": "mri",
            "path": f"radiology/{case.case_id}", "mask_path": f"masks/{case.case_id}"}


# --- slides (Aperio SVS) ------------------------------------------------------------------------


def _slide_fields(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed tissue and tumour fields on the downsample-16 grid (> 0 inside)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    cy, cx = 0.5 + rng.uniform(-0.06, 0.06, 2)
    d2 = ((yy - cy) / 0.36) ** 2 + ((xx - cx) / 0.30) ** 2
    tissue = 1.0 - d2 + 0.45 * _smooth_noise(rng, (n, n), n / 14)
    tissue[d2 < 0.15] = np.maximum(tissue[d2 < 0.15], 0.2)
    depth = ndimage.distance_transform_edt(tissue > 0)
    candidates = np.argwhere(depth >= 0.6 * depth.max())
    ty, tx = candidates[rng.integers(len(candidates))]
    radius = rng.uniform(0.11, 0.16)
    t2 = ((yy - ty / n) ** 2 + (xx - tx / n) ** 2) / radius**2
    tumour = np.minimum(1.0 - t2 + 0.35 * _smooth_noise(rng, (n, n), n / 20), tissue)
    tumour[ty, tx] = max(tumour[ty, tx], 0.05)
    return tissue.astype(np.float32), tumour.astype(np.float32)


def _resize(field: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a float field to size x size (PIL: fast, pixel-centre aligned)."""
    return np.asarray(Image.fromarray(field, mode="F").resize((size, size), Image.BILINEAR))


def _he_background(rng: np.random.Generator, tissue: np.ndarray, tumour: np.ndarray,
                   size: int) -> np.ndarray:
    """H&E colours without nuclei from downsample-4 fields, upsampled to size x size RGB uint8."""
    mid = tissue.shape[0]
    stain = _smooth_noise(rng, (mid, mid), 3.0)[..., None]
    background = np.array([244, 243, 241], np.float32)
    stroma = np.array([236, 168, 200], np.float32)
    dense = np.array([196, 122, 178], np.float32)
    a_tissue = np.clip(tissue[..., None] * 8, 0, 1)
    a_tumour = np.clip(tumour[..., None] * 8, 0, 1)
    colour = (stroma * (1 - a_tumour) + dense * a_tumour) * (1 + 0.06 * stain)
    rgb = background * (1 - a_tissue) + colour * a_tissue
    small = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    return np.array(small.resize((size, size), Image.BILINEAR))


def _disc(radius: int) -> tuple[np.ndarray, np.ndarray]:
    dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    keep = dy**2 + dx**2 <= radius**2
    return dy[keep], dx[keep]


def _stamp_nuclei(rng: np.random.Generator, rgb: np.ndarray, tissue: np.ndarray,
                  tumour: np.ndarray) -> None:
    """Purple nuclei, 4x denser and larger in the tumour, stamped in place (vectorised)."""
    size = rgb.shape[0]
    step = size // tissue.shape[0]
    n_candidates = size * size // 250
    ys = rng.integers(0, size, n_candidates)
    xs = rng.integers(0, size, n_candidates)
    in_tumour = tumour[ys // step, xs // step] > 0
    in_tissue = tissue[ys // step, xs // step] > 0
    accept = rng.random(n_candidates) < np.where(in_tumour, 1.0, np.where(in_tissue, 0.25, 0.0))
    flat = rgb.reshape(-1, 3)
    for region, radius, colour in ((in_tissue & ~in_tumour, 4, (112, 72, 150)),
                                   (in_tumour, 6, (78, 44, 124))):
        pick = accept & region
        dy, dx = _disc(radius)
        rows = np.clip(ys[pick, None] + dy, 0, size - 1)
        cols = np.clip(xs[pick, None] + dx, 0, size - 1)
        shade = rng.uniform(0.85, 1.1, (pick.sum(), 1, 1)) * np.array(colour, np.float32)
        values = np.broadcast_to(np.clip(shade, 0, 255).astype(np.uint8), (*rows.shape, 3))
        flat[(rows * size + cols).ravel()] = values.reshape(-1, 3)


def render_slide(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 RGB of a synthetic H&E slide and its tumour mask at downsample 16."""
    tissue, tumour = _slide_fields(rng, size // 16)
    tissue_mid, tumour_mid = _resize(tissue, size // 4), _resize(tumour, size // 4)
    rgb = _he_background(rng, tissue_mid, tumour_mid, size)
    _stamp_nuclei(rng, rgb, tissue_mid, tumour_mid)
    # fine grain of +-4 in place on uint8 (an int16 copy of level 0 would cost 4x the time)
    np.clip(rgb, 4, 247, out=rgb)
    rgb += rng.integers(0, 9, (size, size, 1), dtype=np.uint8)
    rgb -= 4
    mask = ((tumour > 0) & (tissue > 0)).astype(np.uint8) * 255
    return rgb, mask


def _aperio_description(level0: tuple[int, int], level: tuple[int, int], name: str) -> str:
    width, height = level0
    head = (f"Aperio Image Library v12.0.0 \r\n{width}x{height} [0,0 {width}x{height}] "
            f"({SLIDE_TILE}x{SLIDE_TILE})")
    if level != level0:
        head += f" -> {level[0]}x{level[1]}"
    return (f"{head} JPEG/RGB Q={SLIDE_JPEG_QUALITY}|AppMag = 20|MPP = {SLIDE_MPP}"
            f"|Filename = {name}")


def write_svs(path: Path, rgb: np.ndarray, name: str) -> None:
    """Tiled JPEG pyramid (downsample 1, 4, 16) that OpenSlide reads as vendor 'aperio'."""
    levels = [rgb]
    for previous, current in itertools.pairwise(SLIDE_DOWNSAMPLES):
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(current // previous)))
    level0 = (rgb.shape[1], rgb.shape[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        for level in levels:
            tif.write(level, photometric="rgb", compression="jpeg",
                      compressionargs={"level": SLIDE_JPEG_QUALITY},
                      tile=(SLIDE_TILE, SLIDE_TILE), subfiletype=0, metadata=None,
                      description=_aperio_description(level0, (level.shape[1], level.shape[0]),
                                                      name))


def _write_slide(root: Path, case: _Case, config: SyntheticCohortConfig) -> tuple[dict, dict]:
    rgb, mask = render_slide(_rng(config, "slide", case.index), config.slide_px)
    file_id = case.slide_file_id
    stem = f"{case.case_id}-01Z-00-DX1"
    path = root / "slides" / file_id / f"{stem}.{file_id.upper()}.svs"
    write_svs(path, rgb, stem)
    mask_path = root / "masks" / "slides" / f"{file_id}_mask.tif"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(mask_path, mask, photometric="minisblack", metadata=None)
    image = {"image_id": file_id, "case_id": case.case_id, "modality": "wsi",
             "path": path.relative_to(root).as_posix(),
             "mask_path": mask_path.relative_to(root).as_posix()}
    return _md5_row(root, path, file_id, case.case_id, SLIDE_DATA_TYPE), image
