"""Segmentation metrics agree with hand counts; intervals and paired tests behave."""

from __future__ import annotations

import numpy as np
import pytest

from mgi.evaluate.stats import bootstrap_ci, paired_comparison
from mgi.models.metrics import slice_metrics, volume_metrics


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_slice_metrics_match_hand_counts():
    truth = np.stack([_square(16, 4, 4, 4), np.zeros((16, 16), bool), np.zeros((16, 16), bool)])
    wider = _square(16, 4, 4, 4)
    wider[4:8, 8] = True  # one extra column of 4 pixels
    pred = np.stack([wider, np.zeros((16, 16), bool), _square(16, 0, 0, 1)])
    m = slice_metrics(pred, truth)
    # 16 true pixels, 20 predicted, 16 shared
    assert m["dice"][0] == pytest.approx(32 / 36)
    assert m["iou"][0] == pytest.approx(16 / 20)
    assert m["hd95"][0] == pytest.approx(1.0)
    # empty truth: 1 with an empty prediction, 0 with a false positive; HD95 undefined
    assert m["dice"][1] == 1.0 and m["dice"][2] == 0.0
    assert np.isnan(m["hd95"][1]) and np.isnan(m["hd95"][2])


def test_volume_dice_pools_slices():
    truth = np.stack([_square(8, 0, 0, 2), _square(8, 0, 0, 2)])
    pred = np.stack([_square(8, 0, 0, 2), np.zeros((8, 8), bool)])
    assert volume_metrics(pred, truth)["dice"] == pytest.approx(2 * 4 / (4 + 8))


def test_bootstrap_interval_contains_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.7, 0.1, 10), rng.normal(0.7, 0.1, 400)
    lo_s, hi_s = bootstrap_ci(small, n_boot=2000)
    lo_l, hi_l = bootstrap_ci(large, n_boot=2000)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < hi_s - lo_s


def test_paired_comparison_detects_a_consistent_gain():
    base = np.linspace(0.5, 0.8, 12)
    result = paired_comparison(base + 0.05, base, n_boot=500)
    assert result["mean_diff"] == pytest.approx(0.05)
    assert result["p_wilcoxon"] < 0.01 and result["ci"][0] > 0
    same = paired_comparison(base, base, n_boot=100)
    assert same["p_wilcoxon"] == 1.0
