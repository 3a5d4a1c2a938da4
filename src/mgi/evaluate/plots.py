"""Figures of the report, returned as PNG bytes (matplotlib, no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def pretrain_curves(history: pd.DataFrame, *, chance: float) -> bytes:
    """Contrastive loss (train, validation) and validation recall@1 both ways against chance."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(history["epoch"], history["train_loss"], label="train")
    ax1.plot(history["epoch"], history["val_loss"], label="validation")
    ax1.set(xlabel="epoch", ylabel="CLIP loss", title="Pre-training loss")
    ax1.legend()
    ax2.plot(history["epoch"], history["val_recall_at_1"], label="gene → image")
    if "val_image_to_gene_recall_at_1" in history:
        ax2.plot(history["epoch"], history["val_image_to_gene_recall_at_1"], label="image → gene")
    ax2.axhline(chance, color="grey", linestyle="--", label=f"chance {chance:.2f}")
    ax2.set(xlabel="epoch", ylabel="validation recall@1", ylim=(0, 1.05),
            title="Patient retrieval")
    ax2.legend()
    return _png(fig)


def similarity_matrix(similarity: list[list[float]], cases: list[str]) -> bytes:
    """Cosine similarity of test patients' gene embeddings (rows) and image embeddings (columns)."""
    fig, ax = plt.subplots(figsize=(4, 3.6))
    im = ax.imshow(np.asarray(similarity), cmap="viridis")
    ax.set(xlabel="image of patient", ylabel="genes of patient", title="Test similarity")
    ticks = range(len(cases))
    ax.set_xticks(ticks, [c[-4:] for c in cases], rotation=90, fontsize=7)
    ax.set_yticks(ticks, [c[-4:] for c in cases], fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _png(fig)


def finetune_curves(histories: dict[str, pd.DataFrame]) -> bytes:
    """Training loss and validation patient Dice of every variant, by epoch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for variant, history in histories.items():
        ax1.plot(history["epoch"], history["train_loss"], label=variant)
        ax2.plot(history["epoch"], history["val_dice"], label=variant)
    ax1.set(xlabel="epoch", ylabel="Dice + CE loss", title="Fine-tuning loss")
    ax2.set(xlabel="epoch", ylabel="patient Dice", ylim=(0, 1), title="Validation Dice")
    ax1.legend()
    ax2.legend()
    return _png(fig)


def dice_by_variant(patients: dict[str, pd.DataFrame], intervals: dict[str, tuple]) -> bytes:
    """Per-patient test Dice of each variant (dots, lines join a patient) with mean and 95% CI."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(patients), 3.4))
    variants = list(patients)
    dice = {v: patients[v].set_index("case_id")["dice"] for v in variants}
    cases = sorted(set.intersection(*(set(d.index) for d in dice.values())))
    for case in cases:
        ax.plot(range(len(variants)), [dice[v].loc[case] for v in variants], color="lightgrey",
                zorder=1)
    for i, variant in enumerate(variants):
        values = dice[variant].to_numpy(dtype=float)
        ax.scatter(np.full(len(values), i), values, s=14, zorder=2)
        lo, hi = intervals[variant]
        if np.isfinite(values).any() and np.isfinite([lo, hi]).all():
            mean = np.nanmean(values)
            ax.errorbar(i + 0.15, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", color="black",
                        capsize=4, zorder=3)
    ax.set_xticks(range(len(variants)), variants, rotation=20 if len(variants) > 3 else 0)
    ax.set(ylabel="3D Dice per test patient", ylim=(0, 1.02), title="Segmentation")
    return _png(fig)


def dice_over_runs(segmentation: dict[str, dict]) -> bytes:
    """Each variant's runs (one dot per fold and seed: the mean Dice of that fold's test
    patients; colour = fold, marker = seed) beside its pooled mean and 95% interval."""
    variants = [v for v, m in segmentation.items() if m["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(1.8 + 1.5 * max(1, len(variants)), 3.6))
    markers = "osD^v<>ph"
    folds = sorted({r["fold"] for v in variants for r in segmentation[v]["runs"]})
    seeds = sorted({r["seed"] for v in variants for r in segmentation[v]["runs"]})
    colours = plt.get_cmap("tab10")
    offsets = np.linspace(-0.25, 0.05, max(1, len(seeds)))
    for i, variant in enumerate(variants):
        m = segmentation[variant]
        for run in m["runs"]:
            if run["status"] != "ok":
                continue
            k, j = folds.index(run["fold"]), seeds.index(run["seed"])
            ax.scatter(i + offsets[j], run["dice"], color=colours(k % 10),
                       marker=markers[j % len(markers)], s=22, zorder=2)
        lo, hi = m["dice_ci_low"], m["dice_ci_high"]
        if np.isfinite([m["dice"], lo, hi]).all():
            ax.errorbar(i + 0.2, m["dice"], yerr=[[m["dice"] - lo], [hi - m["dice"]]], fmt="o",
                        color="black", capsize=4, zorder=3)
    for k, fold in enumerate(folds):
        ax.scatter([], [], color=colours(k % 10), marker="o", label=f"fold {fold}")
    for j, seed in enumerate(seeds):
        ax.scatter([], [], color="grey", marker=markers[j % len(markers)], label=f"seed {seed}")
    ax.errorbar([], [], yerr=[], fmt="o", color="black", capsize=4, label="pooled mean, 95% CI")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_xticks(range(len(variants)), variants, rotation=20 if len(variants) > 3 else 0)
    ax.set(ylabel="mean 3D Dice of a run's test patients", ylim=(0, 1.02),
           title="Segmentation over folds and seeds")
    return _png(fig)


def gene_attribution(top: pd.DataFrame) -> bytes:
    """The top genes' mean |attribution| (bars, planted genes coloured) and signed mean (dots)."""
    top = top.iloc[::-1]  # the first gene on top
    planted = top["planted"].astype(str)
    colours = {"": "#8a8a8a", "subtype": "#c0392b", "burden": "#2471a3", "location": "#1e8449"}
    fig, ax = plt.subplots(figsize=(6.4, 0.8 + 0.26 * len(top)))
    y = np.arange(len(top))
    ax.barh(y, top["mean_abs"], color=[colours.get(p, "#7d3c98") for p in planted])
    ax.scatter(top["mean_signed"], y, color="black", s=10, zorder=3, label="signed mean")
    ax.axvline(0, color="black", linewidth=0.6)
    labels = [f"{name} ({p})" if p else str(name)
              for name, p in zip(top["gene_name"], planted, strict=True)]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set(xlabel="attribution to the image–gene similarity (mean |IG| over patients)",
           title="Genes the aligned embedding leans on")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for p, c in colours.items()
               if p and (planted == p).any()]
    names = [f"planted: {p}" for p in colours if p and (planted == p).any()]
    ax.legend([*handles, ax.collections[0]], [*names, "signed mean"], fontsize=7,
              loc="lower right")
    return _png(fig)


def overlay(image: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray],
            *, title: str) -> bytes:
    """One slice with the truth (green) and each variant's prediction (red) outlined."""
    fig, axes = plt.subplots(1, 1 + len(predictions), figsize=(2.6 * (1 + len(predictions)), 2.8))
    axes[0].imshow(image, cmap="gray")
    axes[0].contour(truth, levels=[0.5], colors="lime", linewidths=1)
    axes[0].set_title("truth", fontsize=9)
    for ax, (variant, pred) in zip(axes[1:], predictions.items(), strict=True):
        ax.imshow(image, cmap="gray")
        ax.contour(truth, levels=[0.5], colors="lime", linewidths=1)
        if pred.any():
            ax.contour(pred, levels=[0.5], colors="red", linewidths=1)
        ax.set_title(variant, fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _png(fig)
