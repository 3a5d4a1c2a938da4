"""The fine-tuning variants: what each one trains, and where its pre-trained weights come from.

The one registry of variants. The schema's `finetune.variants` enum, the workflow (through
workflow/registry.json, written by `python -m mgi.registry`) and the report all follow it;
tests/test_registry.py checks that they agree. Adding a variant: one entry here, then
`python -m mgi.registry` and the schema's enum.
"""

from __future__ import annotations

from dataclasses import dataclass

from mgi.errors import TrainingError

# model.gene_encoder.kind's values; variant mgi_{kind} is the gene-encoder ablation of that kind
GENE_ENCODER_KINDS = ("mamba", "transformer", "mlp")


@dataclass(frozen=True)
class VariantSpec:
    """What a fine-tuning variant trains: its network, where it starts, whether it sees genes."""

    network: str  # "vit": ViT + UNETR decoder (SegmentationModel); "unet": MONAI U-Net
    pretrained: bool  # starts from the contrastive pre-training's encoders
    genes: bool  # the gene encoder's embedding is fused into the decoder
    gene_encoder: str | None = None  # gene encoder kind; None = model.gene_encoder.kind

    def gene_kind(self, configured: str) -> str:
        """The gene encoder kind this variant uses (and was pre-trained with), given
        model.gene_encoder.kind."""
        return self.gene_encoder or configured


VARIANTS = {
    "mgi": VariantSpec("vit", pretrained=True, genes=True),
    "mgi_image_only": VariantSpec("vit", pretrained=True, genes=False),
    "vit_scratch": VariantSpec("vit", pretrained=False, genes=False),
    "unet_scratch": VariantSpec("unet", pretrained=False, genes=False),
    # mgi's network and genes without the pre-training: mgi minus this is what pre-training adds
    "vit_scratch_genes": VariantSpec("vit", pretrained=False, genes=True),
    # gene-encoder ablations: the mgi network, pre-trained and fine-tuned with that gene encoder
    **{f"mgi_{kind}": VariantSpec("vit", pretrained=True, genes=True, gene_encoder=kind)
       for kind in GENE_ENCODER_KINDS},
}

# The order of the report's variant table and of its comparisons with mgi (listed first);
# variants not named here follow in the order of the config.
BASELINE_ORDER = ["mgi_image_only", "vit_scratch", "unet_scratch", "vit_scratch_genes",
                  *(f"mgi_{kind}" for kind in GENE_ENCODER_KINDS)]


def variant_spec(variant: str) -> VariantSpec:
    """The spec of a variant, or TrainingError naming the known ones."""
    if variant not in VARIANTS:
        raise TrainingError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[variant]


def pretraining_of(variant: str, *, configured_kind: str) -> str | None:
    """The pre-training run a variant starts from, as a folder under results/{cohort}/
    (`pretrain`, or `pretrain/ablation/{kind}` for an ablation whose gene encoder is not
    model.gene_encoder.kind); None for the variants trained from scratch."""
    spec = variant_spec(variant)
    if not spec.pretrained:
        return None
    kind = spec.gene_kind(configured_kind)
    return "pretrain" if kind == configured_kind else f"pretrain/ablation/{kind}"


def ordered_variants(variants: list[str]) -> list[str]:
    """mgi first, then the known baselines in BASELINE_ORDER, then the rest as configured."""
    known = [v for v in ["mgi", *BASELINE_ORDER] if v in variants]
    return known + [v for v in variants if v not in known]
