"""Patient-level pairs: unique patients per batch, seeded draws, equal slices per process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, set_track_meta

from mgi.errors import TrainingError
from mgi.train.data import load_cohort
from mgi.train.pairs import PatientPairs, augmentation, epoch_batches, local_part, reseed


def test_an_epoch_holds_every_patient_once_in_batches_of_unique_patients():
    batches = epoch_batches(10, batch_size=4, world_size=1, seed=0, epoch=3)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))


def test_batches_depend_on_seed_and_epoch_only():
    a = epoch_batches(10, batch_size=4, world_size=1, seed=0, epoch=1)
    b = epoch_batches(10, batch_size=4, world_size=1, seed=0, epoch=1)
    c = epoch_batches(10, batch_size=4, world_size=1, seed=0, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_short_batches_are_cut_to_equal_parts_per_process_and_need_a_negative():
    # 11 patients, 2 processes: 4 + 4 + 3 -> the 3 is cut to 2 (one pair per process)
    batches = epoch_batches(11, batch_size=4, world_size=2, seed=0, epoch=1)
    assert [len(b) for b in batches] == [4, 4, 2]
    # a last batch of one patient has no negative and is dropped
    assert [len(b) for b in epoch_batches(5, batch_size=4, world_size=1, seed=0, epoch=1)] == [4]
    batch = np.array([7, 3, 9, 1])
    assert local_part(batch, rank=0, world_size=2).tolist() == [7, 3]
    assert local_part(batch, rank=1, world_size=2).tolist() == [9, 1]


def test_pairs_draw_one_seeded_image_of_the_patient_with_its_genes(tiny_cohort):
    data = load_cohort(sequences_path=tiny_cohort.sequences, splits_path=tiny_cohort.splits,
                       qc_path=tiny_cohort.qc)
    pairs = PatientPairs(data, data.items("train"), seed=0)
    assert len(pairs) == 8 and pairs.patients == sorted(pairs.patients)
    image, tokens, values = pairs[(1, 2)]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    row = data.case_row[pairs.patients[2]]
    assert tokens.tolist() == data.sequences.token_ids[row].tolist()
    assert values.tolist() == data.sequences.values[row].tolist()
    # the image is one of that patient's items, the same one for the same key
    own = data.images[pairs.items[2]]
    assert any(np.array_equal(image.numpy(), item) for item in own)
    assert torch.equal(pairs[(1, 2)][0], image)
    draws = {int(np.flatnonzero([np.array_equal(pairs[(e, 2)][0].numpy(), item)
                                 for item in own])[0]) for e in range(12)}
    assert len(draws) > 1  # other epochs draw other images of the patient


def test_augmentation_is_seeded_and_keeps_the_image_close(tiny_cohort):
    data = load_cohort(sequences_path=tiny_cohort.sequences, splits_path=tiny_cohort.splits,
                       qc_path=tiny_cohort.qc)
    plain = PatientPairs(data, data.items("train"), seed=0)
    jittered = PatientPairs(data, data.items("train"), seed=0,
                            augment=augmentation(modality="mri", intensity=0.1))
    for epoch in range(6):
        original, augmented = plain[(epoch, 0)][0], jittered[(epoch, 0)][0]
        assert torch.equal(augmented, jittered[(epoch, 0)][0])
        flipped = original.flip(-1)
        # a scale and a shift of up to 10 %, of the image or of its mirror image
        candidates = [original, flipped]
        fits = [np.polyfit(c.flatten().numpy(), augmented.flatten().numpy(), 1) for c in candidates]
        residuals = [float((np.polyval(f, c.flatten().numpy()) - augmented.flatten().numpy()).std())
                     for f, c in zip(fits, candidates, strict=True)]
        best = int(np.argmin(residuals))
        assert residuals[best] < 1e-3
        scale, _ = fits[best]
        assert 0.9 - 1e-4 <= scale <= 1.1 + 1e-4


def test_wsi_augmentation_flips_both_ways_and_jitters_each_colour():
    transform = augmentation(modality="wsi", intensity=0.1)
    names = [type(t).__name__ for t in transform.transforms]
    assert names.count("RandFlip") == 2 and "RandRotate90" in names
    assert transform.transforms[-1].channel_wise
    assert augmentation(modality="mri", intensity=-1) is None


def test_pairs_need_two_patients(tiny_cohort):
    data = load_cohort(sequences_path=tiny_cohort.sequences, splits_path=tiny_cohort.splits,
                       qc_path=tiny_cohort.qc)
    one = data.items("test")[:1]
    with pytest.raises(TrainingError, match="at least 2 patients"):
        PatientPairs(data, one, seed=0)


def test_gene_dropout_keeps_the_order_of_the_kept_genes_and_pads_at_the_end():
    from mgi.train.pairs import drop_genes

    tokens = np.array([5, 9, 3, 7, 4, 8, 0, 0])
    values = np.array([1.0, 2, 3, 4, 5, 6, 0, 0], dtype=np.float32)
    out_t, out_v = drop_genes(tokens, values, rate=0.5, rng=np.random.default_rng(3))
    kept = out_t[out_t != 0]
    assert 1 <= len(kept) < 6 and (out_t[len(kept):] == 0).all() and (out_v[len(kept):] == 0).all()
    positions = [tokens.tolist().index(t) for t in kept]
    assert positions == sorted(positions)  # order kept
    assert all(out_v[i] == values[p] for i, p in enumerate(positions))  # values travel along
    same_t, same_v = drop_genes(tokens, values, rate=0.0, rng=np.random.default_rng(0))
    assert same_t.tolist() == tokens.tolist() and same_v.tolist() == values.tolist()
    one_t, _ = drop_genes(tokens, values, rate=0.99999, rng=np.random.default_rng(0))
    assert (one_t != 0).sum() == 1


@pytest.mark.parametrize(("modality", "intensity", "shift"),
                         [("mri", 0.1, 0.0), ("mri", 0.1, 0.1), ("wsi", 0.05, 0.0)])
def test_reseeding_gives_the_images_of_monais_own_seeding(modality, intensity, shift):
    """PatientPairs reseeds the transforms and drops MONAI's metadata: the same pixels, to the
    bit, as a fresh `set_random_state(seed=...)` per item with metadata tracked."""
    channels = 3
    images = torch.rand(6, channels, 32, 32)
    ours = augmentation(modality=modality, intensity=intensity, shift=shift, size=32)
    theirs = augmentation(modality=modality, intensity=intensity, shift=shift, size=32)
    ours.set_random_state(seed=0)
    for seed in (0, 7, 2**31 + 5, 123456789):
        for image in images:
            theirs.set_random_state(seed=seed)
            expected = theirs(image)
            expected = expected.as_tensor() if isinstance(expected, MetaTensor) else expected
            reseed(ours, seed)
            set_track_meta(False)
            try:
                got = ours(image)
            finally:
                set_track_meta(True)
            assert type(got) is torch.Tensor
            assert torch.equal(got, expected)
