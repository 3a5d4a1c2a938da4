"""A tiny paired cohort on disk (image banks, gene sequences, splits) and settings to train it."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class TinyCohort:
    """Paths of a tiny cohort and workflow settings (schema defaults + small models)."""

    sequences: Path
    splits: Path
    qc: Path
    settings: dict


def schema_defaults(overrides: dict) -> dict:
    """The workflow config with every schema default filled in under `overrides`."""
    from snakemake.utils import validate

    config = copy.deepcopy(overrides)
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"), set_default=True)
    return config


def write_tiny_cohort(root: Path, *, n_patients: int = 12, items: int = 3, px: int = 16,
                      seq_len: int = 8, seed: int = 0) -> TinyCohort:
    """A cohort whose images and genes share one latent per patient (a bright square's size and
    the bins of the first genes), so alignment is learnable in a few steps."""
    from mgi.expression.tokens import GeneSequences, write_sequences
    from mgi.imaging.bank import write_bank
    from mgi.io import write_tsv

    rng = np.random.default_rng(seed)
    cases = [f"P{i:02d}" for i in range(n_patients)]
    latent = rng.uniform(0, 1, n_patients)
    splits = ["train"] * (n_patients - 4) + ["val"] * 2 + ["test"] * 2
    images_dir = root / "images"
    rows = []
    for case, z in zip(cases, latent, strict=True):
        images = rng.normal(0, 0.2, (items, 1, px, px)).astype(np.float32)
        half = 1 + round(z * (px // 2 - 2))
        images[:, :, px // 2 - half:px // 2 + half, px // 2 - half:px // 2 + half] += 1.5
        masks = np.zeros((items, px, px), np.uint8)
        masks[:, px // 2 - half:px // 2 + half, px // 2 - half:px // 2 + half] = 1
        write_bank(images_dir / f"{case}.h5", images=images.astype(np.float16), masks=masks,
                   coords=np.stack([np.arange(items), np.zeros(items)], axis=1),
                   attrs={"image_id": case, "case_id": case, "modality": "mri"})
        rows.append({"image_id": case, "case_id": case, "status": "ok"})
    write_tsv(pd.DataFrame(rows), images_dir / "qc.tsv")
    write_tsv(pd.DataFrame({"case_id": cases, "split": splits}), root / "splits.tsv")
    n_genes = 12
    token_ids = np.stack([rng.permutation(n_genes)[:seq_len] + 3 for _ in cases]).astype(np.int32)
    values = np.stack([np.clip(np.round(z * 10 + rng.normal(0, 0.5, seq_len)), 1, 10)
                       for z in latent]).astype(np.float32)
    names = ["<pad>", "<cls>", "<mask>"] + [f"G{i}" for i in range(n_genes)]
    vocab = pd.DataFrame({"token_id": np.arange(n_genes + 3),
                          "gene_id": ["", "", ""] + [f"ENSG{i:011d}" for i in range(n_genes)],
                          "gene_name": names})
    seqs = GeneSequences(case_ids=np.array(cases), splits=np.array(splits), token_ids=token_ids,
                         values=values, vocab=vocab, attrs={"vocab_size": len(vocab)})
    write_sequences(seqs, sequences_path=root / "sequences.npz", vocab_path=root / "vocab.tsv")
    settings = schema_defaults({
        "cohort": "tiny", "source": "synthetic", "seed": 0,
        "imaging": {"modality": "mri", "mri": {"image_px": px}},
        "expression": {"seq_len": seq_len, "n_bins": 11},
        "model": {"embed_dim": 16,
                  "gene_encoder": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4},
                  "image_encoder": {"patch_size": 4, "width": 32, "depth": 1, "num_heads": 2}},
        "pretrain": {"epochs": 4, "batch_size": 4, "lr": 0.003, "num_workers": 0,
                     "checkpoint_every": 2, "device": "cpu"},
    })
    return TinyCohort(root / "sequences.npz", root / "splits.tsv", images_dir / "qc.tsv", settings)


@pytest.fixture
def tiny_cohort(tmp_path: Path) -> TinyCohort:
    """A fresh tiny cohort in tmp_path/cohort."""
    return write_tiny_cohort(tmp_path / "cohort")


def settings_json(cohort: TinyCohort, **pretrain: object) -> str:
    """The cohort's settings with `pretrain` overrides, as `mgi pretrain --settings` reads them."""
    import json

    settings = copy.deepcopy(cohort.settings)
    settings["pretrain"].update(pretrain)
    return json.dumps(settings)
