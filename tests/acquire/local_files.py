"""Files of a local cohort for tests: STAR counts, LGG-style slice folders, a sample sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

STAR_HEADER = ["gene_id", "gene_name", "gene_type", "unstranded", "stranded_first",
               "stranded_second", "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded"]


def gene_ids(n_genes: int) -> list[str]:
    """Versioned Ensembl-like gene ids."""
    return [f"ENSG{i:011d}.1" for i in range(1, n_genes + 1)]


def write_star(path: Path, *, seed: int, n_genes: int = 40) -> np.ndarray:
    """A GDC STAR counts file of `n_genes` protein-coding genes; returns its counts."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.uniform(1, 200, n_genes)).astype(int)
    tpm = counts / counts.sum() * 1e6
    lines = ["# gene-model: GENCODE v36", "\t".join(STAR_HEADER)]
    for name in ("N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"):
        lines.append(f"{name}\t\t\t10\t10\t10\t\t\t")
    for gene, count, value in zip(gene_ids(n_genes), counts, tpm, strict=True):
        lines.append(f"{gene}\tG{gene[-5:-2]}\tprotein_coding\t{count}\t0\t{count}\t{value}\t"
                     f"{value}\t{value}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return counts


def write_lgg_patient(root: Path, name: str, *, slices: int = 4, px: int = 32) -> Path:
    """An LGG-set slice folder `{name}_{n}.tif` with `_mask.tif` masks (tumour on slice 2)."""
    folder = root / name
    folder.mkdir(parents=True)
    yy, xx = np.mgrid[:px, :px]
    brain = (yy - px // 2) ** 2 + (xx - px // 2) ** 2 < (px // 3) ** 2
    for n in range(1, slices + 1):
        image = np.zeros((px, px, 3), dtype=np.uint8)
        image[brain] = (60 + n, 120 + n, 90 + n)
        tifffile.imwrite(folder / f"{name}_{n}.tif", image, photometric="rgb")
        mask = np.zeros((px, px), dtype=np.uint8)
        mask[px // 2 - 3:px // 2 + 3, px // 2 - 3:px // 2 + 3] = 255 * (n == 2)
        tifffile.imwrite(folder / f"{name}_{n}_mask.tif", mask)
    return folder


def write_sheet(path: Path, rows: list[dict]) -> Path:
    """A sample sheet (TSV) of `rows`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path
