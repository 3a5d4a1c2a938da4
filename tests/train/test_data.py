"""Contrastive batches never pair a patient with itself and cover every item once per epoch."""

from __future__ import annotations

import numpy as np

from mgi.train.data import to_model_input, unique_case_batches


def test_batches_have_unique_patients_and_cover_every_item():
    item_case = np.array([f"case{i % 5}" for i in range(23)], dtype=object)
    items = np.arange(23)
    batches = unique_case_batches(item_case, items, batch_size=4, rng=np.random.default_rng(1))
    for batch in batches:
        assert len(set(item_case[batch])) == len(batch) >= 2
        assert len(batch) <= 4
    seen = np.concatenate(batches)
    # every item at most once; only singleton leftovers (no negative possible) are dropped
    assert len(seen) == len(set(seen.tolist()))
    assert len(seen) >= 23 - 4


def test_batches_are_seeded():
    item_case = np.array([f"c{i % 3}" for i in range(9)], dtype=object)
    a = unique_case_batches(item_case, np.arange(9), batch_size=3, rng=np.random.default_rng(7))
    b = unique_case_batches(item_case, np.arange(9), batch_size=3, rng=np.random.default_rng(7))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_uint8_tiles_are_scaled_and_mri_passes_through():
    tiles = np.array([[[[0, 255]]]], dtype=np.uint8)
    assert to_model_input(tiles).tolist() == [[[[-2.0, 2.0]]]]
    mri = np.array([[[[0.5, -1.0]]]], dtype=np.float16)
    assert to_model_input(mri).dtype == np.float32
