"""Predictions for new patients: a variant's bundle applied to the sample sheet predict.samples."""


rule predict:
    """Masks, volumes, overlays and QC of the sheet's patients, by the variant's bundle."""
    input:
        bundle=results("export/{variant}.mgi"),
        samples=predict_sheet,
    output:
        volumes=results("predict/{variant}/volumes.tsv"),
        qc=results("predict/{variant}/qc.tsv"),
        masks=directory(results("predict/{variant}/masks")),
        overlays=directory(results("predict/{variant}/overlays")),
        banks=directory(results("predict/{variant}/banks")),
    log:
        logs("predict/{variant}.log"),
    wildcard_constraints:
        variant="[a-z_]+",
    conda:
        ENV
    threads: workflow.cores
    resources:
        mem_mb=4000,
    params:
        out_dir=folder_of("volumes"),
    shell:
        "mgi predict --bundle {input.bundle} --samples {input.samples:q} "
        "--out {params.out_dir} --threads {threads} > {log} 2>&1"
