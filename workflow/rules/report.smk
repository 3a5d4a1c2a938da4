"""The evaluation report: gene attribution, metrics for DVC and a self-contained HTML page."""


rule attribute:
    """Which genes the pre-trained image-gene similarity leans on, over the held-out patients."""
    input:
        unpack(planted_genes),
        model=results("pretrain/model.pt"),
        sequences=results("expression/sequences.npz"),
        vocab=results("expression/vocab.tsv"),
        splits=results("splits.tsv"),
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
    threads: 2
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
    example overlays and gene attribution."""
    input:
        history=results("pretrain/history.tsv"),
        retrieval=results("pretrain/retrieval.json"),
        splits=results("splits.tsv"),
        qc=results("images/qc.tsv"),
        expression=results("expression/expression.h5ad"),
        attribution=results("report/gene_attribution.tsv"),
        attribution_summary=results("report/gene_attribution.json"),
        variants=expand(
            results("finetune/{variant}/test_patients.tsv"),
            variant=config["finetune"]["variants"],
        ),
        status=expand(
            results("finetune/{variant}/status.json"),
            variant=config["finetune"]["variants"],
        ),
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
    log:
        logs("report.log"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
    params:
        settings=settings("evaluate", "finetune"),
        cohort=COHORT,
        results_dir=folder_of("splits", of="input"),
    shell:
        "mgi report --cohort {params.cohort} --results-dir {params.results_dir} "
        "--settings {params.settings:q} --metrics {output.metrics} --html {output.html} "
        "--attribution {input.attribution} "
        "--attribution-summary {input.attribution_summary} --figures {output.figures} "
        "> {log} 2>&1"
