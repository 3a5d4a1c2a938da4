"""Folds and seeds: each fold's splits, sequences and pre-training, one job per run.

Planned only with splits.folds > 1 or several seeds (REPEATED, common.smk). Every rule here is
a stage's own rule (splits, gene_sequences, pretrain, finetune, evaluate) run on one fold's
files, so a fold is computed exactly as the single split is.
"""


wildcard_constraints:
    fold=r"\d+",
    seed=r"\d+",


rule folds:
    """k patient-level folds (stratified by splits.stratify): each patient tested in one."""
    input:
        unpack(given_splits),
        unpack(strata_input),
        h5ad=results("expression/expression.h5ad"),
        qc=results("images/qc.tsv"),
        fixed=results("splits.tsv"),
    output:
        folds=layout("folds"),
        splits=expand(layout("fold_splits"), fold=range(FOLDS)),
    log:
        logs("cv/folds.log"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
    params:
        settings=settings("splits", "seed", design=True),
        given=given_option,
        clinical=strata_option,
    shell:
        "mgi folds --expression {input.h5ad} --qc {input.qc} {params.clinical} "
        "--fixed-splits {input.fixed} --settings {params.settings:q} {params.given} "
        "--folds {output.folds} --out {output.splits} > {log} 2>&1"


use rule gene_sequences as fold_sequences with:
    input:
        unpack(fold_sequence_inputs),
    output:
        sequences=layout("fold_sequences"),
        vocab=layout("fold_vocab"),
        encoding=layout("fold_encoding"),
    log:
        logs("cv/fold{fold}/gene_sequences.log"),


use rule pretrain as fold_pretrain with:
    input:
        sequences=layout("fold_sequences"),
        splits=layout("fold_splits"),
        qc=results("images/qc.tsv"),
    output:
        model=layout("fold_pretrain_model"),
        history=layout("fold_pretrain_history"),
        retrieval=layout("fold_retrieval"),
    log:
        logs("cv/fold{fold}/pretrain/seed{seed}.log"),
    params:
        settings=seeded_settings(*PRETRAIN_SECTIONS),
        out_dir=folder_of("model"),


use rule pretrain_ablation as fold_pretrain_ablation with:
    input:
        sequences=layout("fold_sequences"),
        splits=layout("fold_splits"),
        qc=results("images/qc.tsv"),
    output:
        model=layout("fold_ablation_model"),
        history=layout("fold_ablation_history"),
        retrieval=layout("fold_ablation_retrieval"),
    log:
        logs("cv/fold{fold}/pretrain_ablation/{kind}/seed{seed}.log"),


use rule finetune as run_finetune with:
    input:
        unpack(run_inputs),
    output:
        model=layout("run_model"),
        history=layout("run_finetune_history"),
    log:
        logs("cv/fold{fold}/finetune/{variant}/seed{seed}.log"),
    params:
        settings=seeded_settings("model", "finetune", "imaging", "expression", "seed"),
        pretrained=pretrained_option,
        out_dir=folder_of("model"),


use rule evaluate as run_evaluate with:
    input:
        model=layout("run_model"),
        sequences=layout("fold_sequences"),
        splits=layout("fold_splits"),
        qc=results("images/qc.tsv"),
    output:
        patients=layout("run_test_patients"),
        slices=layout("run_test_slices"),
        predictions=layout("run_test_predictions"),
        masks=directory(layout("run_predicted_masks")),
        status=layout("run_status"),
    log:
        logs("cv/fold{fold}/evaluate/{variant}/seed{seed}.log"),


rule crossval:
    """Every run of every fold and seed, and its status, in one table (with one split and
    one seed: no runs, the folds table only)."""
    input:
        folds=layout("folds"),
        status=run_files("run_status") if REPEATED else [],
        retrievals=fold_retrievals() if REPEATED else [],
    output:
        runs=layout("runs"),
    log:
        logs("cv/runs.log"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
    params:
        runs=RUN_KEYS,
    shell:
        "mgi runs --runs {params.runs} --status {input.status} --out {output.runs} "
        "> {log} 2>&1"
