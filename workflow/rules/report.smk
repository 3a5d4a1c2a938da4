"""The evaluation report: gene attribution, metrics for DVC and a self-contained HTML page."""


rule attribute:
    """Which genes the pre-trained image-gene similarity leans on, over the held-out patients."""
    input:
        unpack(planted_genes),
        model=pretrain_file("model.pt"),
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
        history=pretrain_input("history.tsv"),
        retrieval=pretrain_input("retrieval.json"),
        splits=results("splits.tsv"),
        qc=results("images/qc.tsv"),
        banks=image_banks,
        attribution=results("report/gene_attribution.tsv"),
        attribution_summary=results("report/gene_attribution.json"),
        patients=variant_files("test_patients.tsv"),
        slices=variant_files("test_slices.tsv"),
        predictions=variant_files("test_predictions.h5"),
        status=variant_files("status.json"),
        histories=variant_files("history.tsv"),
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
        variants=" ".join(config["finetune"]["variants"]),
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
        "> {log} 2>&1"
