"""Expression files to an AnnData matrix, then to ordered gene sequences."""


rule expression_matrix:
    """One expression profile per case (AnnData: obs = cases, var = genes, layers counts/tpm)."""
    input:
        unpack(matrix_input),
        manifest=raw("manifest.tsv"),
        clinical=raw("clinical.tsv"),
        files=EXPRESSION_FILES,
    output:
        h5ad=results("expression/expression.h5ad"),
    log:
        logs("expression_matrix.log"),
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
    params:
        raw_dir=folder_of("manifest", of="input"),
        layers=value_layers(),
        duplicates=config["expression"]["duplicate_profiles"],
        matrix=matrix_option,
    shell:
        "mgi expression --manifest {input.manifest} --clinical {input.clinical} "
        "--raw-dir {params.raw_dir} --layers {params.layers} "
        "--duplicates {params.duplicates} {params.matrix} --out {output.h5ad} > {log} 2>&1"


rule gene_sequences:
    """Ordered gene token sequences and their vocabulary, fitted on the training split."""
    input:
        unpack(sequence_inputs),
    output:
        sequences=results("expression/sequences.npz"),
        vocab=results("expression/vocab.tsv"),
        encoding=results("expression/encoding.npz"),
    log:
        logs("gene_sequences.log"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
    params:
        settings=settings("expression"),
        gtf=gtf_option,
        encoding=encoding_option,
    shell:
        "mgi sequences --expression {input.h5ad} --splits {input.splits} "
        "--settings {params.settings:q} {params.gtf} {params.encoding} "
        "--sequences {output.sequences} "
        "--vocab {output.vocab} --encoding {output.encoding} > {log} 2>&1"
