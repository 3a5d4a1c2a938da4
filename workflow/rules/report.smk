"""The evaluation report: metrics for DVC and a self-contained HTML page."""


rule report:
    """All variants side by side, with intervals, curves, retrieval and example overlays."""
    input:
        history=results("pretrain/history.tsv"),
        retrieval=results("pretrain/retrieval.json"),
        splits=results("splits.tsv"),
        qc=results("images/qc.tsv"),
        expression=results("expression/expression.h5ad"),
        variants=expand(
            results("finetune/{variant}/test_patients.tsv"),
            variant=config["finetune"]["variants"],
        ),
    output:
        metrics=results("report/metrics.json"),
        html=report(results("report/report.html"), category="Report"),
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
        "> {log} 2>&1"
