"""Readers for GDC augmented STAR gene-count files (`*.rna_seq.augmented_star_gene_counts.tsv`).

Layout, as the GDC writes it (plain or gzip):

    # gene-model: GENCODE v36
    gene_id  gene_name  gene_type  unstranded  stranded_first  stranded_second  tpm_unstranded ...
    N_unmapped      ...   (4 QC rows: only the count columns are filled)
    N_multimapping  ...
    N_noFeature     ...
    N_ambiguous     ...
    ENSG00000000003.15  TSPAN6  protein_coding  429  0  0  92548.07 ...
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mgi.errors import ExpressionFileError
from mgi.io import compression_of

log = logging.getLogger(__name__)

GENE_COLUMNS = ("gene_id", "gene_name", "gene_type")
COUNT_COLUMNS = ("unstranded", "stranded_first", "stranded_second")
FLOAT_COLUMNS = ("tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded")
DEFAULT_COLUMNS = ("unstranded", "tpm_unstranded")
# QC rows of the file -> the names they get in StarCounts.qc and in tables (snake case).
QC_ROWS = {
    "N_unmapped": "n_unmapped",
    "N_multimapping": "n_multimapping",
    "N_noFeature": "n_no_feature",
    "N_ambiguous": "n_ambiguous",
}
# QC counts are taken from this column (the GDC reports them for the unstranded library).
QC_COLUMN = "unstranded"
FIRST_DATA_LINE = 3  # line 1: gene-model comment, line 2: header
_GENE_MODEL = re.compile(r"^#\s*gene-model:\s*(\S.*?)\s*$")


@dataclass
class StarCounts:
    """One STAR gene-count file: its gene model, genes, the numeric columns read and QC counts."""

    path: Path
    gene_model: str
    genes: pd.DataFrame  # gene_id (versioned), gene_name, gene_type; QC rows excluded
    values: dict[str, np.ndarray] = field(default_factory=dict)  # column -> (n_genes,)
    qc: dict[str, int] = field(default_factory=dict)  # n_unmapped, n_multimapping, ...


@dataclass
class _Parsed:
    """What one file yields before it becomes a StarCounts (kept in Arrow for fast comparison)."""

    path: Path
    gene_model: str
    genes: pa.Table
    values: dict[str, np.ndarray]
    qc: dict[str, int]


def read_star_counts(
    path: str | os.PathLike[str], *, columns: Sequence[str] = DEFAULT_COLUMNS
) -> StarCounts:
    """Return the validated contents of one STAR gene-count file (plain or gzip)."""
    parsed = _parse(Path(path), tuple(columns), use_threads=True)
    return StarCounts(
        path=parsed.path,
        gene_model=parsed.gene_model,
        genes=parsed.genes.to_pandas(),
        values=parsed.values,
        qc=parsed.qc,
    )


def read_star_cohort(
    paths: Iterable[str | os.PathLike[str]],
    *,
    columns: Sequence[str] = DEFAULT_COLUMNS,
    max_workers: int | None = None,
    dtype: np.dtype | type | None = None,
) -> tuple[pd.DataFrame, dict[str, np.ndarray], pd.DataFrame]:
    """Return (genes, {column: (n_files, n_genes) matrix}, per-file QC table) for many files.

    Rows of every matrix and of the QC table (index: path as given) follow the order of `paths`.
    All files must share one gene model and the same gene ids in the same order. Matrices are
    int64 (counts) or float64 unless `dtype` is given. Memory stays near the size of the
    matrices: each file's values are written into them as soon as it is parsed, and only the
    first file's gene table is kept.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ExpressionFileError("read_star_cohort: no files given, expected at least one")
    columns = tuple(columns)
    workers = max_workers or min(8, _usable_cpus())
    first = _parse(paths[0], columns, use_threads=True, check_unique=True)
    first_ids = first.genes.column("gene_id")
    matrices = {
        c: np.empty((len(paths), len(first_ids)), dtype=dtype or first.values[c].dtype)
        for c in columns
    }
    qc_rows: list[dict[str, int]] = [{} for _ in paths]

    def store(index: int, parsed: _Parsed) -> None:
        if parsed.gene_model != first.gene_model:
            raise ExpressionFileError(
                f"{parsed.path}: gene model {parsed.gene_model!r} differs from "
                f"{first.gene_model!r} of {first.path}; expected one gene model per cohort"
            )
        ids = parsed.genes.column("gene_id")
        if not ids.equals(first_ids):
            raise ExpressionFileError(
                f"{parsed.path}: gene ids differ from {first.path} "
                f"({_first_difference(first_ids, ids)}); expected the same genes in the "
                "same order in every file"
            )
        for c in columns:
            matrices[c][index] = parsed.values[c]
        qc_rows[index] = parsed.qc

    def parse_and_store(index: int) -> None:
        store(index, _parse(paths[index], columns, use_threads=False, check_unique=False))

    store(0, first)
    # Files are parsed one per thread (pyarrow releases the GIL); within a file, single-threaded.
    # map() re-raises in input order, so the first bad file in `paths` is the one reported.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(parse_and_store, range(1, len(paths))):
            pass

    qc = pd.DataFrame(qc_rows, index=pd.Index([str(p) for p in paths], name="path"))
    genes = first.genes.to_pandas()
    genes.attrs["gene_model"] = first.gene_model
    return genes, matrices, qc


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# --- parsing -----------------------------------------------------------------------------------


def _parse(
    path: Path, columns: tuple[str, ...], *, use_threads: bool, check_unique: bool = True
) -> _Parsed:
    raw = _read_bytes(path)
    if not raw or raw.isspace():
        raise ExpressionFileError(f"{path}: file is empty, expected a STAR gene-count table")
    end_1 = raw.find(b"\n")
    end_1 = len(raw) if end_1 < 0 else end_1
    gene_model = _check_gene_model(path, raw[:end_1])
    end_2 = raw.find(b"\n", end_1 + 1)
    header_line = raw[end_1 + 1 : len(raw) if end_2 < 0 else end_2]
    header = header_line.decode("utf-8", errors="replace").rstrip("\r").split("\t")
    wanted = list(dict.fromkeys((*GENE_COLUMNS, QC_COLUMN, *columns)))
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ExpressionFileError(
            f"{path}: missing column(s) {missing} in the header (line 2); found {header}"
        )

    numeric = [c for c in wanted if c not in GENE_COLUMNS]
    types = {c: pa.string() for c in GENE_COLUMNS}
    types.update({c: pa.int64() if c in COUNT_COLUMNS else pa.float64() for c in numeric})
    try:
        table = pacsv.read_csv(
            pa.BufferReader(pa.py_buffer(raw)),
            read_options=pacsv.ReadOptions(skip_rows=1, use_threads=use_threads),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=wanted, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as err:
        # The conversion error says neither the line nor the gene: find them by scanning.
        bad = _first_bad_value(path, raw, header, numeric)
        raise ExpressionFileError(
            bad or f"{path}: cannot parse as a STAR gene-count table: {err}"
        ) from err

    ids = table.column("gene_id")
    is_qc = pc.is_in(ids, value_set=pa.array(list(QC_ROWS)))
    n_qc = len(QC_ROWS)
    if pc.sum(is_qc).as_py() == n_qc and pc.all(is_qc.slice(0, n_qc)).as_py():
        qc_table, genes = table.slice(0, n_qc), table.slice(n_qc)  # the GDC layout: QC first
    else:
        qc_table, genes = table.filter(is_qc), table.filter(pc.invert(is_qc))
    found = qc_table.column("gene_id").to_pylist()
    absent = [name for name in QC_ROWS if name not in found]
    if absent:
        raise ExpressionFileError(
            f"{path}: QC row(s) {absent} missing; expected the 4 rows {list(QC_ROWS)} "
            "after the header"
        )
    if len(found) != len(QC_ROWS):
        raise ExpressionFileError(f"{path}: QC rows repeated ({found}); expected each once")
    if genes.num_rows == 0:
        raise ExpressionFileError(f"{path}: no gene rows after the QC rows")

    for name in numeric:
        column = table.column(name)
        nulls_in_genes = genes.column(name).null_count
        nulls_in_qc = qc_table.column(name).null_count if name in COUNT_COLUMNS else 0
        negative = column.null_count < len(column) and pc.min(column).as_py() < 0
        infinite = name not in COUNT_COLUMNS and pc.any(pc.is_inf(column)).as_py()
        if nulls_in_genes or nulls_in_qc or negative or infinite:
            raise ExpressionFileError(
                _first_bad_value(path, raw, header, [name])
                or f"{path}: column {name!r} has missing or negative values"
            )

    if check_unique:
        _check_unique_ids(path, genes)

    qc_values = dict(zip(found, qc_table.column(QC_COLUMN).to_pylist(), strict=True))
    return _Parsed(
        path=path,
        gene_model=gene_model,
        genes=genes.select(list(GENE_COLUMNS)),
        values={c: genes.column(c).to_numpy() for c in columns},
        qc={QC_ROWS[name]: int(qc_values[name]) for name in QC_ROWS},
    )


def _check_unique_ids(path: Path, genes: pa.Table) -> None:
    dup = pc.value_counts(genes.column("gene_id"))
    if pc.max(dup.field("counts")).as_py() > 1:
        repeated = pc.filter(dup.field("values"), pc.greater(dup.field("counts"), 1))
        raise ExpressionFileError(
            f"{path}: gene id(s) repeated, e.g. {repeated[0].as_py()!r}; expected unique gene ids"
        )


def _read_bytes(path: Path) -> bytes:
    """Whole file, decompressed if it starts with the gzip magic number (whatever its suffix)."""
    try:
        with pa.input_stream(str(path), compression=compression_of(path)) as stream:
            return stream.read()
    except FileNotFoundError as err:
        raise ExpressionFileError(f"{path}: file not found") from err
    except (OSError, pa.ArrowException) as err:
        raise ExpressionFileError(f"{path}: cannot read ({err})") from err


def _check_gene_model(path: Path, first_line: bytes) -> str:
    line = first_line.decode("utf-8", errors="replace").rstrip("\r")
    match = _GENE_MODEL.match(line)
    if not match:
        raise ExpressionFileError(
            f"{path}: line 1 is {line[:80]!r}; expected a '# gene-model: <name>' comment "
            "(e.g. '# gene-model: GENCODE v36')"
        )
    return match.group(1)


def _first_bad_value(
    path: Path, raw: bytes, header: list[str], names: list[str]
) -> str | None:
    """Message for the first value of `names` that is not a valid number, or None.

    A plain line scan, used only once a file is known to be bad: Arrow's errors name neither the
    line nor the gene, and this is what a user needs to find the value.
    """
    positions = {name: header.index(name) for name in names}
    lines = raw.decode("utf-8", errors="replace").split("\n")
    for lineno, line in enumerate(lines[FIRST_DATA_LINE - 1 :], start=FIRST_DATA_LINE):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            return (
                f"{path}: line {lineno} has {len(fields)} fields; expected {len(header)} "
                f"(the header's columns)"
            )
        is_qc = fields[0] in QC_ROWS
        for name, pos in positions.items():
            value = fields[pos]
            integer = name in COUNT_COLUMNS
            if value == "" and is_qc and not integer:
                continue  # QC rows leave TPM/FPKM empty
            expected = "a non-negative integer" if integer else "a non-negative number"
            try:
                number = int(value) if integer else float(value)
            except ValueError:
                what = "not an integer" if integer and _is_float(value) else "not numeric"
                return (
                    f"{path}: line {lineno} ({fields[0]}), column {name!r}: {value!r} is "
                    f"{what}; expected {expected}"
                )
            if not 0 <= number < float("inf"):  # negative, NaN or infinite
                return (
                    f"{path}: line {lineno} ({fields[0]}), column {name!r}: {value!r}; "
                    f"expected {expected}"
                )
    return None


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _first_difference(a: pa.ChunkedArray, b: pa.ChunkedArray) -> str:
    if len(a) != len(b):
        return f"{len(b)} genes instead of {len(a)}"
    left, right = a.to_pylist(), b.to_pylist()
    i = next(i for i, (x, y) in enumerate(zip(left, right, strict=True)) if x != y)
    return f"gene {i + 1} is {right[i]!r} instead of {left[i]!r}"
