"""mgi: contrastive pre-training of a Mamba gene encoder and a ViT, then tumour segmentation.

Run the embedded demo with `snakemake --cores all`; a real cohort with
`snakemake --cores all --configfile cohorts/tcga-lgg.yaml`. See README.md.
"""


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"


# The first rule is the default target: the report of the configured cohort, and the
# predictions for new patients when predict.samples names their sample sheet.
rule all:
    """The report of the configured cohort, and everything it needs (with a bundle as
    finetune.pretrained: the variants' evaluation and the gene attribution)."""
    input:
        report_targets(),
        predict_targets(),


include: "workflow/rules/acquire.smk"
include: "workflow/rules/expression.smk"
include: "workflow/rules/imaging.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/crossval.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/predict.smk"
