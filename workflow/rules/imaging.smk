"""Images to the image bank: MR series to normalised slices, or slides to tissue tiles.

One job per image, so a cluster spreads them; a bad image is reported in its QC row (status
failed) and the cohort goes on without it.
"""

if MODALITY == "mri":

    rule mri_bank:
        """Normalised, co-registered MR slices (sequences as channels) and tumour masks."""
        input:
            unpack(image_inputs),
        output:
            bank=results("images/{image_id}.h5"),
            qc=results("images/qc/{image_id}.tsv"),
        log:
            logs("mri_bank/{image_id}.log"),
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
        params:
            settings=settings("imaging", "seed"),
            raw_dir=raw_dir,
        shell:
            "mgi image --images {input.table} --image-id {wildcards.image_id} "
            "--raw-dir {params.raw_dir} --settings {params.settings:q} "
            "--bank {output.bank} --qc {output.qc} > {log} 2>&1"

else:

    rule stain_reference:
        """The cohort's stain normaliser, fitted once (a reference tile or sampled tissue tiles)."""
        input:
            unpack(slide_files),
        output:
            reference=STAIN_REFERENCE,
        log:
            logs("stain_reference.log"),
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
        params:
            settings=settings("imaging", "seed"),
            # not from the input: before the image table exists (a bundle asked for first),
            # Snakemake stands the checkpoint's output in for this rule's inputs
            raw_dir=os.path.dirname(raw("images.tsv")),
        shell:
            "mgi stain-reference --images {input.table} --raw-dir {params.raw_dir} "
            "--settings {params.settings:q} --out {output.reference} > {log} 2>&1"

    rule tile_slide:
        """Tissue tiles of one slide at the configured resolution, with a QC thumbnail."""
        input:
            unpack(image_inputs),
        output:
            bank=results("images/{image_id}.h5"),
            qc=results("images/qc/{image_id}.tsv"),
            thumbnail=results("images/qc/{image_id}.png"),
        log:
            logs("tile_slide/{image_id}.log"),
        conda:
            ENV
        # slide reads at once; raise it per rule where cores are plenty (--set-threads)
        threads: 1
        resources:
            mem_mb=4000,
        params:
            settings=settings("imaging", "seed"),
            raw_dir=raw_dir,
            stain=stain_option,
        shell:
            "mgi image --images {input.table} --image-id {wildcards.image_id} "
            "--raw-dir {params.raw_dir} --settings {params.settings:q} {params.stain} "
            "--threads {threads} --bank {output.bank} --qc {output.qc} "
            "--thumbnail {output.thumbnail} > {log} 2>&1"


rule image_qc:
    """The cohort's QC table: one row per image (status, reason, items kept, resolution)."""
    input:
        image_banks,
        rows=image_qc_rows,
    output:
        qc=results("images/qc.tsv"),
    log:
        logs("image_qc.log"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
    shell:
        "mgi qc-merge {input.rows} --out {output.qc} > {log} 2>&1"
