"""Patient-level train/validation/test splits."""


rule splits:
    """Each patient with both an expression profile and a usable image, in exactly one split."""
    input:
        unpack(given_splits),
        h5ad=results("expression/expression.h5ad"),
        qc=results("images/qc.tsv"),
    output:
        splits=results("splits.tsv"),
    log:
        logs("splits.log"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
    params:
        settings=settings("splits", "seed"),
        given=given_option,
    shell:
        "mgi splits --expression {input.h5ad} --qc {input.qc} --settings {params.settings:q} "
        "{params.given} --out {output.splits} > {log} 2>&1"
