"""Training data: bank pixels as model input, labelled and unlabelled items."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mgi.train.data import to_model_input


def test_uint8_tiles_are_scaled_and_mri_passes_through():
    tiles = np.array([[[[0, 255]]]], dtype=np.uint8)
    assert to_model_input(tiles).tolist() == [[[[-2.0, 2.0]]]]
    mri = np.array([[[[0.5, -1.0]]]], dtype=np.float16)
    assert to_model_input(mri).dtype == np.float32


def test_unlabelled_images_serve_pretraining_only(tmp_path):
    """A bank without masks is loaded (pre-training pairs it) but never scored as tumour-free."""
    from mgi.expression.tokens import GeneSequences, write_sequences
    from mgi.imaging.bank import write_bank
    from mgi.io import write_tsv
    from mgi.train.data import load_cohort

    images = tmp_path / "images"
    rows = []
    for case, with_mask in (("A", True), ("B", False), ("C", True)):
        masks = np.ones((2, 4, 4), dtype=np.uint8) if with_mask else None
        write_bank(images / f"{case}.h5", images=np.zeros((2, 1, 4, 4), np.float16), masks=masks,
                   coords=np.zeros((2, 2)), attrs={"image_id": case, "case_id": case,
                                                   "modality": "mri"})
        rows.append({"image_id": case, "case_id": case, "status": "ok"})
    write_tsv(pd.DataFrame(rows), images / "qc.tsv")
    write_tsv(pd.DataFrame({"case_id": ["A", "B", "C"], "split": ["train", "train", "test"]}),
              tmp_path / "splits.tsv")
    seqs = GeneSequences(case_ids=np.array(["A", "B", "C"]), splits=np.array(["train"] * 3),
                         token_ids=np.ones((3, 4), np.int32), values=np.zeros((3, 4), np.float32),
                         vocab=pd.DataFrame({"token_id": [0, 1, 2, 3], "gene_id": ["", "", "", "g"],
                                             "gene_name": ["<pad>", "<cls>", "<mask>", "G"]}))
    write_sequences(seqs, sequences_path=tmp_path / "s.npz", vocab_path=tmp_path / "v.tsv")
    data = load_cohort(sequences_path=tmp_path / "s.npz", splits_path=tmp_path / "splits.tsv",
                       qc_path=images / "qc.tsv")
    assert data.item_case[data.items("train")].tolist() == ["A", "A", "B", "B"]
    assert data.item_case[data.items("train", labelled=True)].tolist() == ["A", "A"]
    assert data.item_case[data.items("test", labelled=True)].tolist() == ["C", "C"]


def test_banks_held_in_memory_serve_what_the_files_hold(tiny_cohort):
    """A small cohort is read once into memory; its items and masks are those read on demand."""
    from mgi.train.data import load_cohort

    paths = {"sequences_path": tiny_cohort.sequences, "splits_path": tiny_cohort.splits,
             "qc_path": tiny_cohort.qc}
    on_demand = load_cohort(**paths, in_memory_bytes=0)
    in_memory = load_cohort(**paths)
    assert in_memory.images.in_memory and in_memory.masks.in_memory
    assert not on_demand.images.in_memory and not on_demand.masks.in_memory
    assert not on_demand.images.load_into_memory(max_bytes=on_demand.images.nbytes - 1)
    assert in_memory.images.nbytes == len(in_memory.images) * 4 * 16 * 16
    items = np.array([5, 0, 5, len(in_memory.images) - 1])
    np.testing.assert_array_equal(in_memory.images[items], on_demand.images[items])
    np.testing.assert_array_equal(in_memory.masks[items], on_demand.masks[items])
    np.testing.assert_array_equal(in_memory.images[3], on_demand.images[3])
    assert in_memory.masks[items].sum() > 0


def test_one_item_from_memory_is_a_copy_of_what_the_files_hold(tiny_cohort):
    from mgi.train.data import load_cohort

    paths = {"sequences_path": tiny_cohort.sequences, "splits_path": tiny_cohort.splits,
             "qc_path": tiny_cohort.qc}
    on_demand = load_cohort(**paths, in_memory_bytes=0)
    in_memory = load_cohort(**paths)
    for array, files in ((in_memory.images, on_demand.images), (in_memory.masks, on_demand.masks)):
        for item in (0, np.int64(len(array) - 1), *range(1, len(array), 5)):
            got, expected = array[item], files[item]
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
        got = array[2]
        got += 1  # the caller may change it: the held items stay as they were
        np.testing.assert_array_equal(array[2], files[2])
        with pytest.raises(IndexError):
            array[len(array)]
