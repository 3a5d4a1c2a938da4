"""Segmentation fine-tuning, one job per variant, and its evaluation on held-out patients."""


rule finetune:
    """One variant (finetune.variants) trained by the same code on the same splits."""
    input:
        unpack(variant_inputs),
    output:
        model=results("finetune/{variant}/model.pt"),
        history=results("finetune/{variant}/history.tsv"),
    log:
        logs("finetune/{variant}.log"),
    wildcard_constraints:
        variant="[a-z_]+",
    conda:
        ENV
    threads: VARIANT_THREADS
    resources:
        mem_mb=8000,
        gpu=1,
    params:
        settings=settings("model", "finetune", "imaging", "expression", "seed"),
        pretrained=pretrained_option,
        out_dir=folder_of("model"),
    shell:
        "mgi finetune --variant {wildcards.variant} {params.pretrained} "
        "--sequences {input.sequences} "
        "--splits {input.splits} --qc {input.qc} --settings {params.settings:q} "
        "--out-dir {params.out_dir} --threads {threads} "
        "> {log} 2>&1"


rule evaluate:
    """Dice, IoU and HD95 per slice and per patient on the test split, masks per patient, status."""
    input:
        model=results("finetune/{variant}/model.pt"),
        sequences=results("expression/sequences.npz"),
        splits=results("splits.tsv"),
        qc=results("images/qc.tsv"),
    output:
        patients=results("finetune/{variant}/test_patients.tsv"),
        slices=results("finetune/{variant}/test_slices.tsv"),
        predictions=results("finetune/{variant}/test_predictions.h5"),
        masks=directory(results("finetune/{variant}/predictions")),
        status=results("finetune/{variant}/status.json"),
    log:
        logs("evaluate/{variant}.log"),
    wildcard_constraints:
        variant="[a-z_]+",
    conda:
        ENV
    threads: VARIANT_THREADS
    resources:
        mem_mb=4000,
    params:
        settings=settings("evaluate"),
    shell:
        "mgi evaluate --model {input.model} --sequences {input.sequences} "
        "--splits {input.splits} --qc {input.qc} --settings {params.settings:q} "
        "--patients {output.patients} --slices {output.slices} "
        "--predictions {output.predictions} --predictions-dir {output.masks} "
        "--status {output.status} --threads {threads} > {log} 2>&1"


rule export:
    """A variant's bundle (one zip): checkpoint, encoding, settings, stain reference, versions
    and the pre-training it started from."""
    input:
        unpack(bundle_inputs),
    output:
        bundle=results("export/{variant}.mgi"),
    log:
        logs("export/{variant}.log"),
    wildcard_constraints:
        variant="[a-z_]+",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
    params:
        threshold=config["evaluate"]["threshold"],
        results=cohort_results,
        pretrain=bundle_pretrain_option,
    shell:
        "mgi export --variant {wildcards.variant} --results {params.results} {params.pretrain} "
        "--out {output.bundle} --threshold {params.threshold} > {log} 2>&1"
