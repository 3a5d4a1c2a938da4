"""The evaluation report: gene attribution, metrics for DVC and a self-contained HTML page."""


rule attribute:
    """Which genes the pre-trained image-gene similarity leans on, over the held-out patients."""
    input:
        unpack(planted_genes),
        model=detail_input("pretrain_model"),
        sequences=detail_input("sequences"),
        vocab=detail_input("vocab"),
        splits=detail_input("splits"),
        qc=results("images/qc.tsv"),
    output:
        table=report(
            results("report/gene_attribution.tsv"),
            category="Gene attribution",
            caption="../report/gene_attribution.rst",
        ),
        summary=results("report/gene_attribution.json"),
    log:
        logs("attribute.log"),
    conda:
        ENV
    # one: it is ready with the fine-tunings that start from the pre-training, and runs beside them
    threads: 1
    resources:
        mem_mb=4000,
    params:
        planted=planted_option,
    shell:
        "mgi attribute --model {input.model} --sequences {input.sequences} "
        "--vocab {input.vocab} --splits {input.splits} --qc {input.qc} {params.planted} "
        "--out {output.table} --summary {output.summary} --threads {threads} > {log} 2>&1"


rule report:
    """All variants side by side (failed ones as failed), with intervals, curves, retrieval,
    example overlays and gene attribution; with folds and seeds, every run pooled."""
    input:
        history=detail_input("pretrain_history"),
        retrieval=detail_input("retrieval"),
        splits=detail_input("splits"),
        qc=results("images/qc.tsv"),
        banks=image_banks,
        attribution=results("report/gene_attribution.tsv"),
        attribution_summary=results("report/gene_attribution.json"),
        patients=detail_variant_files("test_patients"),
        slices=detail_variant_files("test_slices"),
        predictions=detail_variant_files("test_predictions"),
        status=detail_variant_files("status"),
        histories=detail_variant_files("finetune_history"),
        # folds and seeds only (crossval.smk): every run, and every fold's pre-training
        run_patients=run_files("run_test_patients") if REPEATED else [],
        run_status=run_files("run_status") if REPEATED else [],
        run_histories=run_files("run_finetune_history") if REPEATED else [],
        fold_retrievals=fold_retrievals() if REPEATED else [],
    output:
        metrics=report(
            results("report/metrics.json"),
            category="Report",
            caption="../report/metrics.rst",
        ),
        html=report(
            results("report/report.html"),
            category="Report",
            caption="../report/report.rst",
        ),
        figures=report(
            directory(results("report/figures")),
            patterns=["{name}.png"],
            category="Curves and figures",
            caption="../report/figures.rst",
        ),
        test_patients=layout("pooled_test_patients"),
    log:
        logs("report.log"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
    params:
        settings=settings("evaluate", "finetune", "splits", "seed", design=True),
        cohort=COHORT,
        variants=" ".join(config["finetune"]["variants"]),
        runs=RUN_KEYS,
        pretrainings=PRETRAINING_KEYS,
    shell:
        "mgi report --cohort {params.cohort} --settings {params.settings:q} "
        "--retrieval {input.retrieval} --pretrain-history {input.history} "
        "--splits {input.splits} --qc {input.qc} --banks {input.banks} "
        "--variants {params.variants} --patients {input.patients} "
        "--slices {input.slices} --predictions {input.predictions} "
        "--status {input.status} --histories {input.histories} "
        "--attribution {input.attribution} "
        "--attribution-summary {input.attribution_summary} "
        "--metrics {output.metrics} --html {output.html} --figures {output.figures} "
        "--test-patients {output.test_patients} --runs {params.runs} "
        "--run-patients {input.run_patients} --run-status {input.run_status} "
        "--run-histories {input.run_histories} --pretrainings {params.pretrainings} "
        "--fold-retrievals {input.fold_retrievals} > {log} 2>&1"
