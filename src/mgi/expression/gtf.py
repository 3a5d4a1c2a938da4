"""Gene positions from a GENCODE GTF: the `genomic` gene order reads chromosome and start here.

The GDC aligns RNA-seq against GENCODE v36 and publishes that GTF among its reference files
(`gencode.v36.annotation.gtf.gz`); the demo writes a small one in the same layout:

    ##description: evidence-based annotation of the human genome (GRCh38), version 36 (Ensembl 102)
    chr1  HAVANA  gene  11869  14409  .  +  .  gene_id "ENSG00000223972.5"; gene_type "..."; ...

Written here rather than with gtfparse or pyranges: those parse every attribute of all ~3
million rows into a frame (gtfparse also pulls in polars), while the order needs four fields of
the ~60k `gene` rows. pyarrow's streaming CSV reader does that in bounded memory.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mgi.errors import ExpressionFileError
from mgi.io import compression_of

log = logging.getLogger(__name__)

GTF_COLUMNS = ["seqname", "source", "feature", "start", "end", "score", "strand", "frame",
               "attributes"]
POSITION_COLUMNS = ["gene_id_version", "gene_name", "gene_type", "chromosome", "start", "end",
                    "strand"]
# GENCODE version suffix; PAR_Y copies (ENSG....N_PAR_Y) keep their suffix so ids stay unique.
VERSION_SUFFIX = re.compile(r"\.\d+(?=(_PAR_Y)?$)")
_GENE_MODEL_VERSION = re.compile(r"\bv(?:ersion)?\s*(\d+)\b", re.IGNORECASE)
_ATTRIBUTES = {name: rf'{name} "(?P<{name}>[^"]*)"' for name in ("gene_id", "gene_name",
                                                                  "gene_type")}
_HEADER_LINES = 20  # GENCODE puts its ##description and friends in the first 5 lines


def unversioned(ids: pd.Series) -> pd.Series:
    """Gene ids without their GENCODE version ("ENSG00000000003.15" -> "ENSG00000000003")."""
    return ids.astype(str).str.replace(VERSION_SUFFIX, "", regex=True)


def chromosome_rank(names: pd.Series) -> pd.Series:
    """Sort key of chromosome names: 1..22, X, Y, M (with or without "chr"), then the rest."""
    bare = names.astype(str).str.removeprefix("chr")
    named = {"X": 23, "Y": 24, "M": 25, "MT": 25}
    rank = pd.to_numeric(bare.where(bare.str.fullmatch(r"\d+")), errors="coerce")
    rank = rank.fillna(bare.map(named))
    return rank.fillna(1000).astype(int)


def gtf_version(path: str | os.PathLike[str]) -> int | None:
    """The GENCODE release stated in the GTF's `##description` header line, or None."""
    with _open_text(Path(path)) as handle:
        for _, line in zip(range(_HEADER_LINES), handle, strict=False):
            if not line.startswith("#"):
                break
            if line.startswith("##description"):
                match = re.search(r"version (\d+)", line)
                return int(match.group(1)) if match else None
    return None


def check_gene_model(gtf_path: str | os.PathLike[str], gene_model: str) -> None:
    """Raise if the GTF's GENCODE release differs from the expression files' gene model.

    `gene_model` is the STAR files' `# gene-model:` value (e.g. "GENCODE v36"). A GTF or a
    gene model without a release number is let through with a warning.
    """
    stated = gtf_version(gtf_path)
    match = _GENE_MODEL_VERSION.search(gene_model or "")
    if stated is None or match is None:
        log.warning("%s: cannot compare the GTF's GENCODE release (%s) with the expression "
                    "files' gene model %r", gtf_path, stated, gene_model)
        return
    if int(match.group(1)) != stated:
        raise ExpressionFileError(
            f"{gtf_path}: GENCODE version {stated} in its ##description line, but the expression "
            f"files were quantified with {gene_model!r}; expected the GTF of the same release"
        )


def read_gene_positions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Return one row per `gene` record of a GTF (plain or gzip), indexed by unversioned gene id.

    Columns: gene_id_version, gene_name, gene_type, chromosome, start, end (1-based,
    inclusive, as in the GTF), strand. Comment lines (`#...`) are skipped wherever they are.
    """
    path = Path(path)
    if not path.is_file():
        raise ExpressionFileError(f"{path}: GTF file not found")
    try:
        batches = _gene_batches(path)
    except (OSError, pa.ArrowException) as err:
        raise ExpressionFileError(f"{path}: cannot read as a GTF ({err}); expected 9 "
                                  "tab-separated columns") from err
    if not batches:
        raise ExpressionFileError(f"{path}: no 'gene' records; expected a GENCODE GTF")
    table = pa.concat_tables(batches)
    frame = pd.DataFrame({
        "gene_id_version": _attribute(table, "gene_id", path),
        "gene_name": _attribute(table, "gene_name", path, required=False),
        "gene_type": _attribute(table, "gene_type", path, required=False),
        "chromosome": table.column("seqname").to_numpy(zero_copy_only=False),
        "start": table.column("start").to_numpy(),
        "end": table.column("end").to_numpy(),
        "strand": table.column("strand").to_numpy(zero_copy_only=False),
    })
    frame.index = pd.Index(unversioned(frame["gene_id_version"]).to_numpy())
    repeated = frame.index[frame.index.duplicated()]
    if len(repeated):
        raise ExpressionFileError(
            f"{path}: gene id(s) {sorted(set(repeated))[:5]} on more than one 'gene' record; "
            "expected each gene once"
        )
    log.info("%s: %d genes on %d sequences", path, len(frame), frame["chromosome"].nunique())
    return frame


def genomic_order(positions: pd.DataFrame) -> pd.Series:
    """Rank of each gene (index as `positions`) along the genome: chromosome, start, then id."""
    key = pd.DataFrame({
        "rank": chromosome_rank(positions["chromosome"]).to_numpy(),
        "chromosome": positions["chromosome"].astype(str).to_numpy(),
        "start": positions["start"].to_numpy(),
        "gene_id": positions.index.astype(str),
    })
    order = key.sort_values(["rank", "chromosome", "start", "gene_id"], kind="stable").index
    rank = pd.Series(0, index=positions.index, dtype="int64")
    rank.iloc[order.to_numpy()] = range(len(order))
    return rank


def _open_text(path: Path):
    return gzip.open(path, "rt") if compression_of(path) == "gzip" else open(path)


def _gene_batches(path: Path) -> list[pa.Table]:
    compression = compression_of(path)

    def skip_comments(row: pacsv.InvalidRow) -> str:
        return "skip" if (row.text or "").startswith("#") else "error"

    wanted = ["seqname", "feature", "start", "end", "strand", "attributes"]
    batches = []
    with pa.input_stream(str(path), compression=compression) as stream:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=GTF_COLUMNS, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False,
                                              invalid_row_handler=skip_comments),
            convert_options=pacsv.ConvertOptions(
                include_columns=wanted,
                column_types={"seqname": pa.string(), "feature": pa.string(),
                              "start": pa.int64(), "end": pa.int64(), "strand": pa.string(),
                              "attributes": pa.string()},
            ),
        )
        for batch in reader:
            genes = batch.filter(pc.equal(batch.column("feature"), "gene"))
            if genes.num_rows:
                batches.append(pa.Table.from_batches([genes]))
    return batches


def _attribute(table: pa.Table, name: str, path: Path, *, required: bool = True):
    found = pc.extract_regex(table.column("attributes"), _ATTRIBUTES[name])
    values = pc.struct_field(found, [0])
    missing = values.null_count
    if missing and required:
        first = pc.index(pc.is_null(values), True).as_py()
        raise ExpressionFileError(
            f"{path}: 'gene' record {first + 1} has no {name} attribute "
            f"({table.column('attributes')[first].as_py()[:80]!r}); expected {name} \"...\""
        )
    return values.fill_null("").to_numpy(zero_copy_only=False)
