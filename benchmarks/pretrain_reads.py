"""How fast pre-training draws its pairs from a small cohort held in memory, against reading the
HDF5 banks item by item.

Work: `--epochs` epochs of what the `pretrain` rule draws on the CPU: one image per training
patient (with the demo's flips and intensity jitter) and the validation draws (4 fixed images
per validation patient). Ours: as pre-training does now: `load_cohort` reads a cohort whose
model-ready pixels fit in `IN_MEMORY_BYTES` once into memory (that read is timed), and the
validation draws are made once (`validation_draws`). Baseline: as it did before: every item read
on demand (`in_memory_bytes=0`: one chunked, LZF-compressed HDF5 item per pair) and the
validation draws read again after every epoch. limit_s: indexing and stacking as many items
from an array already in memory, without augmentation.

The cohort is written by the script in the banks' own format (`write_bank`): the demo's size by
default (96 patients, 8 slices of 3 x 64 x 64, float16). Both must draw the same pixels
(checked). `--quick`: 20 epochs. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from mgi.expression.tokens import GeneSequences, write_sequences  # noqa: E402
from mgi.imaging.bank import write_bank  # noqa: E402
from mgi.io import write_tsv  # noqa: E402
from mgi.train.data import load_cohort  # noqa: E402
from mgi.train.pairs import PatientPairs, augmentation  # noqa: E402
from mgi.train.pretrain import validation_draws  # noqa: E402


def write_cohort(root: Path, *, n_patients: int, slices: int, px: int, seq_len: int) -> dict:
    """Banks, QC table, splits and gene sequences of a cohort split 55/20/25 %; the paths."""
    rng = np.random.default_rng(0)
    cases = [f"P{i:03d}" for i in range(n_patients)]
    n_val, n_test = round(0.2 * n_patients), round(0.25 * n_patients)
    splits = ["train"] * (n_patients - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    for case in cases:
        images = rng.normal(0, 1, (slices, 3, px, px)).astype(np.float16)
        masks = (rng.random((slices, px, px)) > 0.9).astype(np.uint8)
        write_bank(root / "images" / f"{case}.h5", images=images, masks=masks,
                   coords=np.stack([np.arange(slices), np.zeros(slices)], axis=1),
                   attrs={"image_id": case, "case_id": case, "modality": "mri"})
    write_tsv(pd.DataFrame({"image_id": cases, "case_id": cases, "status": "ok"}),
              root / "images" / "qc.tsv")
    write_tsv(pd.DataFrame({"case_id": cases, "split": splits}), root / "splits.tsv")
    vocab = pd.DataFrame({"token_id": np.arange(seq_len + 3),
                          "gene_id": [""] * 3 + [f"G{i}" for i in range(seq_len)],
                          "gene_name": ["<pad>", "<cls>", "<mask>"]
                          + [f"G{i}" for i in range(seq_len)]})
    sequences = GeneSequences(
        case_ids=np.array(cases), splits=np.array(splits),
        token_ids=np.tile(np.arange(3, seq_len + 3, dtype=np.int32), (n_patients, 1)),
        values=rng.normal(0, 1, (n_patients, seq_len)).astype(np.float32), vocab=vocab)
    write_sequences(sequences, sequences_path=root / "s.npz", vocab_path=root / "v.tsv")
    return {"sequences_path": root / "s.npz", "splits_path": root / "splits.tsv",
            "qc_path": root / "images" / "qc.tsv"}


def draw_epochs(paths: dict, *, epochs: int, in_memory_bytes: int | None,
                validation_once: bool) -> tuple[float, float]:
    """Seconds to load the cohort and draw `epochs` epochs of pairs; a checksum of the pixels."""
    start = time.perf_counter()
    kwargs = {} if in_memory_bytes is None else {"in_memory_bytes": in_memory_bytes}
    data = load_cohort(**paths, **kwargs)
    pairs = PatientPairs(data, data.items("train"), seed=0,
                         augment=augmentation(modality="mri", intensity=0.1))
    val_pairs = PatientPairs(data, data.items("val"), seed=0)
    val_images = validation_draws(val_pairs)[0] if validation_once else None
    checksum = 0.0
    for epoch in range(1, epochs + 1):
        images = torch.stack([pairs[(epoch, p)][0] for p in range(len(pairs))])
        if not validation_once:
            val_images = validation_draws(val_pairs)[0]
        checksum += float(images.double().sum() + val_images.double().sum())
    return time.perf_counter() - start, checksum


def limit(paths: dict, *, epochs: int) -> float:
    """Seconds to index and stack the same number of items from an array in memory."""
    data = load_cohort(**paths)
    pixels = data.images[np.arange(len(data.images))]
    train, val = data.items("train"), data.items("val")
    n_train, n_val = len(set(data.item_case[train])), len(set(data.item_case[val]))
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(epochs):
        torch.from_numpy(np.stack([pixels[i] for i in rng.choice(train, n_train)]))
        torch.from_numpy(np.stack([pixels[i] for i in rng.choice(val, 4 * n_val)]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 epochs")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--patients", type=int, default=96)
    args = parser.parse_args()
    epochs = 20 if args.quick else args.epochs
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_cohort(Path(tmp), n_patients=args.patients, slices=8, px=64, seq_len=64)
        ours_s, ours_sum = draw_epochs(paths, epochs=epochs, in_memory_bytes=None,
                                       validation_once=True)
        base_s, base_sum = draw_epochs(paths, epochs=epochs, in_memory_bytes=0,
                                       validation_once=False)
        limit_s = limit(paths, epochs=epochs)
    if not np.isclose(ours_sum, base_sum, rtol=0, atol=1e-6 * abs(base_sum) + 1e-6):
        raise SystemExit(f"in memory and on demand drew different pixels: {ours_sum} {base_sum}")
    print(f"{epochs} epochs of pairs, {args.patients} patients: in memory {ours_s:.2f} s, "
          f"read on demand {base_s:.2f} s, index and stack alone {limit_s:.2f} s")
    print(json.dumps({
        "name": "pretrain_reads", "ours_s": round(ours_s, 3),
        "baseline": "every item read from the HDF5 banks on demand, validation draws every epoch",
        "baseline_s": round(base_s, 3), "ratio": round(base_s / ours_s, 2),
        "limit_s": round(limit_s, 3), "n": epochs, "unit": "epochs",
        "patients": args.patients,
    }))


if __name__ == "__main__":
    main()
