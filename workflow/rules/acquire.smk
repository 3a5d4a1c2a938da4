"""Raw data of the cohort: the embedded demo (source synthetic), the GDC and TCIA (source gdc)
or your own files named by a sample sheet (source local, read in place).

Either way the stage ends in the same files, which every later stage reads: manifest.tsv (GDC
files in gdc-client columns), clinical.tsv, images.tsv (one row per image: id, case, modality,
path, mask path), the raw files under expression/, slides/, radiology/ and masks/, and the
GENCODE GTF under reference/.
"""

if config["source"] == "synthetic":

    checkpoint synthesize:
        """The embedded demo cohort, written in the formats of the real sources."""
        output:
            manifest=raw("manifest.tsv"),
            images=raw("images.tsv"),
            clinical=raw("clinical.tsv"),
            truth=raw("synthetic_truth.tsv"),
            genes=raw("synthetic_genes.tsv"),
            expression=directory(raw("expression")),
            radiology=directory(raw("radiology")),
            slides=directory(raw("slides")),
            masks=directory(raw("masks")),
            gtf=GENE_ANNOTATION,
        log:
            logs("synthesize.log"),
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
        params:
            settings=settings("synthetic", "seed"),
            raw_dir=folder_of("manifest"),
        shell:
            "mgi synthesize --settings {params.settings:q} --out-dir {params.raw_dir} "
            "> {log} 2>&1"

    IMAGE_TABLE = "synthesize"
    EXPRESSION_FILES = raw("expression")

elif config["source"] == "local":

    checkpoint local_cohort:
        """The sample sheet's patients: their files checked and listed in place, none copied."""
        input:
            samples=config["sources"]["local"]["samples"],
        output:
            manifest=raw("manifest.tsv"),
            clinical=raw("clinical.tsv"),
            images=raw("images.tsv"),
            splits=raw("given_splits.tsv"),
            failures=raw("expression_failures.tsv"),
        log:
            logs("local_cohort.log"),
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
        params:
            settings=settings("sources", "imaging"),
            raw_dir=folder_of("manifest"),
        shell:
            "mgi acquire local --settings {params.settings:q} --manifest {output.manifest} "
            "--clinical {output.clinical} --images {output.images} "
            "--raw-dir {params.raw_dir} > {log} 2>&1"

    IMAGE_TABLE = "local_cohort"
    EXPRESSION_FILES = raw("expression_failures.tsv")

else:

    rule gdc_query:
        """The cohort's open expression files (and slides) from the GDC, with clinical fields."""
        output:
            manifest=raw("manifest.tsv"),
            clinical=raw("clinical.tsv"),
        log:
            logs("gdc_query.log"),
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
        params:
            settings=settings("sources", "imaging"),
        shell:
            "mgi acquire gdc-query --settings {params.settings:q} "
            "--manifest {output.manifest} --clinical {output.clinical} > {log} 2>&1"

    rule gdc_download:
        """Every file of the manifest, resumed, md5-checked and renamed into place.

        Its output is the failure list, not the folders: Snakemake deletes folder outputs before
        a rerun, which would throw away every finished download.
        """
        input:
            manifest=raw("manifest.tsv"),
        output:
            failures=raw("download_failures.tsv"),
        log:
            logs("gdc_download.log"),
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=2000,
        params:
            settings=settings("sources"),
            raw_dir=folder_of("manifest", of="input"),
        shell:
            "mgi acquire gdc-download --settings {params.settings:q} "
            "--manifest {input.manifest} --raw-dir {params.raw_dir} > {log} 2>&1"

    rule gene_annotation:
        """The GENCODE GTF of the GDC reference files (gene positions for the genomic order)."""
        output:
            gtf=GENE_ANNOTATION,
        log:
            logs("gene_annotation.log"),
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=1000,
        params:
            settings=gtf_settings(),
        shell:
            "mgi acquire gtf --settings {params.settings:q} --out {output.gtf} > {log} 2>&1"

    checkpoint image_table:
        """The image table: MR series from TCIA (with masks) or the slides just downloaded."""
        input:
            manifest=raw("manifest.tsv"),
            downloads=raw("download_failures.tsv"),
        output:
            images=raw("images.tsv"),
        log:
            logs("image_table.log"),
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=2000,
        params:
            settings=settings("sources", "imaging"),
            raw_dir=folder_of("manifest", of="input"),
        shell:
            "mgi acquire images --settings {params.settings:q} --manifest {input.manifest} "
            "--raw-dir {params.raw_dir} --images {output.images} > {log} 2>&1"

    IMAGE_TABLE = "image_table"
    EXPRESSION_FILES = raw("download_failures.tsv")
