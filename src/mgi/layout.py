"""Where a cohort's files live, and the columns of the tables that stages hand each other.

The one owner of the results layout (paths under results/{cohort}/) and of the image table's
columns. The workflow's rules and dvc.yaml spell the same paths; tests/test_registry.py checks
that every path they name is one of RESULTS (and workflow/registry.json carries both to the
workflow, which cannot import this package).
"""

from __future__ import annotations

from pathlib import Path

# name -> path under results/{cohort}/ ({image_id}, {variant}, {kind}, {fold}, {seed}:
# wildcards)
RESULTS = {
    "expression": "expression/expression.h5ad",
    "sequences": "expression/sequences.npz",
    "vocab": "expression/vocab.tsv",
    "encoding": "expression/encoding.npz",
    "bank": "images/{image_id}.h5",
    "qc_row": "images/qc/{image_id}.tsv",
    "thumbnail": "images/qc/{image_id}.png",
    "qc": "images/qc.tsv",
    "images": "images",
    "stain_reference": "images/stain_reference.json",
    "splits": "splits.tsv",
    "pretrain_model": "pretrain/model.pt",
    "pretrain_history": "pretrain/history.tsv",
    "retrieval": "pretrain/retrieval.json",
    "ablations": "pretrain/ablation",
    "ablation_model": "pretrain/ablation/{kind}/model.pt",
    "ablation_history": "pretrain/ablation/{kind}/history.tsv",
    "ablation_retrieval": "pretrain/ablation/{kind}/retrieval.json",
    "pretrained_model": "pretrained/model.pt",  # finetune.pretrained: a bundle's (unbundled)
    "pretrained_encoding": "pretrained/encoding.npz",
    "finetunes": "finetune",
    "finetune_model": "finetune/{variant}/model.pt",
    "finetune_history": "finetune/{variant}/history.tsv",
    "test_patients": "finetune/{variant}/test_patients.tsv",
    "test_slices": "finetune/{variant}/test_slices.tsv",
    "test_predictions": "finetune/{variant}/test_predictions.h5",
    "predicted_masks": "finetune/{variant}/predictions",
    "status": "finetune/{variant}/status.json",
    # folds and seeds (splits.folds > 1 or several seeds): each fold mirrors the layout above
    "crossval": "cv",
    "folds": "cv/folds.tsv",
    "runs": "cv/runs.tsv",  # every run and its status (the DVC stage crossval's target)
    "fold_splits": "cv/fold{fold}/splits.tsv",
    "fold_sequences": "cv/fold{fold}/expression/sequences.npz",
    "fold_vocab": "cv/fold{fold}/expression/vocab.tsv",
    "fold_encoding": "cv/fold{fold}/expression/encoding.npz",
    "fold_pretrain_model": "cv/fold{fold}/pretrain/seed{seed}/model.pt",
    "fold_pretrain_history": "cv/fold{fold}/pretrain/seed{seed}/history.tsv",
    "fold_retrieval": "cv/fold{fold}/pretrain/seed{seed}/retrieval.json",
    "fold_ablation_model": "cv/fold{fold}/pretrain/ablation/{kind}/seed{seed}/model.pt",
    "fold_ablation_history": "cv/fold{fold}/pretrain/ablation/{kind}/seed{seed}/history.tsv",
    "fold_ablation_retrieval": "cv/fold{fold}/pretrain/ablation/{kind}/seed{seed}/retrieval.json",
    "run_model": "cv/fold{fold}/finetune/{variant}/seed{seed}/model.pt",
    "run_finetune_history": "cv/fold{fold}/finetune/{variant}/seed{seed}/history.tsv",
    "run_test_patients": "cv/fold{fold}/finetune/{variant}/seed{seed}/test_patients.tsv",
    "run_test_slices": "cv/fold{fold}/finetune/{variant}/seed{seed}/test_slices.tsv",
    "run_test_predictions": "cv/fold{fold}/finetune/{variant}/seed{seed}/test_predictions.h5",
    "run_predicted_masks": "cv/fold{fold}/finetune/{variant}/seed{seed}/predictions",
    "run_status": "cv/fold{fold}/finetune/{variant}/seed{seed}/status.json",
    "bundle": "export/{variant}.mgi",
    "predict_volumes": "predict/{variant}/volumes.tsv",
    "predict_qc": "predict/{variant}/qc.tsv",
    "predict_masks": "predict/{variant}/masks",
    "predict_overlays": "predict/{variant}/overlays",
    "predict_banks": "predict/{variant}/banks",
    "attribution": "report/gene_attribution.tsv",
    "attribution_summary": "report/gene_attribution.json",
    "metrics": "report/metrics.json",
    "pooled_test_patients": "report/test_patients.tsv",  # every variant, fold and seed
    "report": "report/report.html",
    "figures": "report/figures",
}

# images.tsv (data/{cohort}/raw/): one row per image of the cohort, written by the acquire
# stage (synthetic, TCIA/IDC, GDC slides) and read by the imaging stage and the workflow.
IMAGE_TABLE_COLUMNS = ["image_id", "case_id", "modality", "path", "mask_path"]


def results_path(root: Path, name: str, **wildcards: str) -> Path:
    """The path of artifact `name` (a key of RESULTS) under a cohort's results folder."""
    return Path(root) / RESULTS[name].format(**wildcards)
