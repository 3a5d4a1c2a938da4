"""Typed options: the validated config as frozen dataclasses, built once at the CLI boundary.

One dataclass per config section mirrors the schema (workflow/schemas/config.schema.yaml, shipped
in the package as mgi/config.schema.yaml), and one `*Settings` class per stage holds the
sections its rule passes with `--settings`. The schema is the only source of defaults: every
field's default below is read from it (`default_of`), and tests/test_options.py checks that every
schema key is a field and every field a schema key.

Stage code takes these objects (`options.pretrain.epochs`), never raw `settings["..."]`.
Adding a config key: the schema (type, default, description), then one field here.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mgi.errors import ConfigError

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


@functools.cache
def schema() -> dict:
    """The config's JSON schema (the workflow validates the config against the same file)."""
    # libyaml's loader where PyYAML has it: the pure-Python one takes about 0.1 s on this file,
    # paid by every `mgi` job
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(SCHEMA_PATH.read_text(), Loader=loader)


def schema_node(path: str) -> dict:
    """The schema of one dotted config key, e.g. `pretrain.epochs`."""
    node = schema()
    for key in path.split("."):
        node = node["properties"][key]
    return node


def default_of(path: str) -> Any:
    """A dataclass field whose default is the schema's for `path` (lists become tuples)."""
    value = schema_node(path)["default"]
    if isinstance(value, list):
        return field(default=tuple(value))
    if isinstance(value, dict):
        raise TypeError(f"{path}: an object section; give its dataclass as the default factory")
    return field(default=value)


# --- sources --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GtfOptions:
    """sources.gdc.gtf: the GDC reference file with the GENCODE GTF."""

    file_id: str = default_of("sources.gdc.gtf.file_id")
    md5: str = default_of("sources.gdc.gtf.md5")
    size: int | None = default_of("sources.gdc.gtf.size")


@dataclass(frozen=True)
class GdcOptions:
    """sources.gdc: the NCI Genomic Data Commons API."""

    api_url: str = default_of("sources.gdc.api_url")
    project_ids: tuple[str, ...] = default_of("sources.gdc.project_ids")
    workflow_type: str = default_of("sources.gdc.workflow_type")
    slide_strategies: tuple[str, ...] = default_of("sources.gdc.slide_strategies")
    max_cases: int | None = default_of("sources.gdc.max_cases")
    parallel: int = default_of("sources.gdc.parallel")
    token_env: str = default_of("sources.gdc.token_env")
    gtf: GtfOptions = field(default_factory=GtfOptions)


@dataclass(frozen=True)
class TciaOptions:
    """sources.tcia: where the MR studies come from."""

    provider: str = default_of("sources.tcia.provider")
    api_url: str = default_of("sources.tcia.api_url")
    collection: str = default_of("sources.tcia.collection")
    masks_url: str | None = default_of("sources.tcia.masks_url")
    folder: str | None = default_of("sources.tcia.folder")
    layout: str = default_of("sources.tcia.layout")  # dicom | lgg_tif | nifti
    nifti_labels: str = default_of("sources.tcia.nifti_labels")


@dataclass(frozen=True)
class LocalOptions:
    """sources.local: your own cohort, from a sample sheet (source local)."""

    samples: str | None = default_of("sources.local.samples")
    matrix: str | None = default_of("sources.local.matrix")
    gtf: str | None = default_of("sources.local.gtf")


@dataclass(frozen=True)
class SourcesOptions:
    """sources: the data sources of a real cohort (remote, or a local sample sheet)."""

    gdc: GdcOptions = field(default_factory=GdcOptions)
    tcia: TciaOptions = field(default_factory=TciaOptions)
    local: LocalOptions = field(default_factory=LocalOptions)


@dataclass(frozen=True)
class SyntheticOptions:
    """synthetic: size of the embedded demo cohort."""

    n_cases: int = default_of("synthetic.n_cases")
    n_genes: int = default_of("synthetic.n_genes")
    n_linked_genes: int = default_of("synthetic.n_linked_genes")
    slices: int = default_of("synthetic.slices")
    image_px: int = default_of("synthetic.image_px")
    n_slides: int = default_of("synthetic.n_slides")
    slide_px: int = default_of("synthetic.slide_px")


# --- imaging --------------------------------------------------------------------------------


def _rule_default(key: str) -> Any:
    rule = schema_node("imaging.mri.roles")["additionalProperties"]
    return rule["properties"][key].get("default")


@dataclass(frozen=True)
class RoleRule:
    """imaging.mri.roles.<role>: how one sequence role is chosen from a study's series."""

    description: tuple[str, ...]
    exclude: tuple[str, ...] = field(default=tuple(_rule_default("exclude")))
    contrast: str = field(default=_rule_default("contrast"))  # pre | post | any
    inversion_time_ms: tuple[float, ...] | None = field(default=_rule_default("inversion_time_ms"))
    planes: tuple[str, ...] = field(default=tuple(_rule_default("planes")))
    nifti: str | None = field(default=_rule_default("nifti"))
    lgg_channel: int | None = field(default=_rule_default("lgg_channel"))

    @classmethod
    def of(cls, value: typing.Mapping[str, Any]) -> RoleRule:
        """A rule from its (schema-validated) mapping, lists as tuples."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


def _default_roles() -> dict[str, RoleRule]:
    return {name: RoleRule.of(rule)
            for name, rule in schema_node("imaging.mri.roles")["default"].items()}


@dataclass(frozen=True)
class MriOptions:
    """imaging.mri: MR studies to normalised slices."""

    sequences: tuple[str, ...] = default_of("imaging.mri.sequences")
    reference: str = default_of("imaging.mri.reference")
    roles: dict[str, RoleRule] = field(default_factory=_default_roles)
    series_overrides: str | None = default_of("imaging.mri.series_overrides")
    study: str = default_of("imaging.mri.study")  # earliest | most_complete
    min_slices: int = default_of("imaging.mri.min_slices")
    allow_derived: bool = default_of("imaging.mri.allow_derived")
    register: str = default_of("imaging.mri.register")  # none | rigid
    min_coverage: float = default_of("imaging.mri.min_coverage")
    missing_sequence: str = default_of("imaging.mri.missing_sequence")
    image_px: int = default_of("imaging.mri.image_px")
    clip_percentiles: tuple[float, ...] = default_of("imaging.mri.clip_percentiles")
    normalise: str = default_of("imaging.mri.normalise")
    keep_slices: str = default_of("imaging.mri.keep_slices")

    def __post_init__(self) -> None:
        # `build` passes the schema-checked mapping; hold each rule typed
        roles = {name: rule if isinstance(rule, RoleRule) else RoleRule.of(rule)
                 for name, rule in self.roles.items()}
        object.__setattr__(self, "roles", roles)
        unknown = [name for name in (*self.sequences, self.reference) if name not in roles]
        if unknown:
            raise ConfigError(f"imaging.mri.sequences/reference: role(s) {unknown} have no rule "
                              f"in imaging.mri.roles (rules for {sorted(roles)})")


@dataclass(frozen=True)
class StainOptions:
    """imaging.wsi.stain: the cohort's stain normaliser."""

    method: str = default_of("imaging.wsi.stain.method")
    reference_tile: str | None = default_of("imaging.wsi.stain.reference_tile")
    max_slides: int = default_of("imaging.wsi.stain.max_slides")
    tiles_per_slide: int = default_of("imaging.wsi.stain.tiles_per_slide")


@dataclass(frozen=True)
class WsiOptions:
    """imaging.wsi: slides to tissue tiles."""

    tile_px: int = default_of("imaging.wsi.tile_px")
    mpp: float = default_of("imaging.wsi.mpp")
    mpp_fallback: float | None = default_of("imaging.wsi.mpp_fallback")
    tissue_min: float = default_of("imaging.wsi.tissue_min")
    max_tiles: int = default_of("imaging.wsi.max_tiles")
    stain: StainOptions = field(default_factory=StainOptions)


@dataclass(frozen=True)
class ImagingOptions:
    """imaging: which images, and how they become model inputs."""

    modality: str = default_of("imaging.modality")
    mri: MriOptions = field(default_factory=MriOptions)
    wsi: WsiOptions = field(default_factory=WsiOptions)

    @property
    def image_px(self) -> int:
        """Side of the model's square input: the MR slice size or the slide tile size."""
        return self.mri.image_px if self.modality == "mri" else self.wsi.tile_px


@dataclass(frozen=True)
class SplitsOptions:
    """splits: patient-level train/val/test fractions."""

    val_fraction: float = default_of("splits.val_fraction")
    test_fraction: float = default_of("splits.test_fraction")
    folds: int = default_of("splits.folds")
    stratify: str | None = default_of("splits.stratify")


# --- expression -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpressionOptions:
    """expression: the matrix's duplicate rule, then how profiles become gene sequences."""

    gene_types: tuple[str, ...] = default_of("expression.gene_types")  # empty: every gene type
    min_fraction_expressed: float = default_of("expression.min_fraction_expressed")
    duplicate_profiles: str = default_of("expression.duplicate_profiles")
    normalize: str = default_of("expression.normalize")  # log1p_cpm | tpm | fpkm_uq
    n_hvg: int | None = default_of("expression.n_hvg")  # top-n highly-variable genes (train fit)
    gene_list: str | None = default_of("expression.gene_list")  # genes kept (fixed: in order)
    order: str = default_of("expression.order")  # rank | genomic | fixed
    values: str = default_of("expression.values")  # bins | continuous | zscore
    n_bins: int = default_of("expression.n_bins")  # bin 0 = not expressed
    seq_len: int = default_of("expression.seq_len")  # tokens per sequence, <cls> included


# --- model and training ---------------------------------------------------------------------


@dataclass(frozen=True)
class GeneEncoderOptions:
    """model.gene_encoder: the Mamba (or an ablation's) gene encoder."""

    kind: str = default_of("model.gene_encoder.kind")
    d_model: int = default_of("model.gene_encoder.d_model")
    n_layers: int = default_of("model.gene_encoder.n_layers")
    d_state: int = default_of("model.gene_encoder.d_state")
    d_conv: int = default_of("model.gene_encoder.d_conv")
    expand: int = default_of("model.gene_encoder.expand")
    bidirectional: bool = default_of("model.gene_encoder.bidirectional")
    n_heads: int = default_of("model.gene_encoder.n_heads")
    dropout: float = default_of("model.gene_encoder.dropout")
    scan_backend: str = default_of("model.gene_encoder.scan_backend")
    recompute: bool = default_of("model.gene_encoder.recompute")


@dataclass(frozen=True)
class ImageEncoderOptions:
    """model.image_encoder: the ViT."""

    model_name: str = default_of("model.image_encoder.model_name")
    patch_size: int = default_of("model.image_encoder.patch_size")
    width: int | None = default_of("model.image_encoder.width")
    depth: int | None = default_of("model.image_encoder.depth")
    num_heads: int | None = default_of("model.image_encoder.num_heads")
    weights: str | None = default_of("model.image_encoder.weights")
    pos_embed: str = default_of("model.image_encoder.pos_embed")


@dataclass(frozen=True)
class ModelOptions:
    """model: both encoders and the shared embedding."""

    embed_dim: int = default_of("model.embed_dim")
    gene_encoder: GeneEncoderOptions = field(default_factory=GeneEncoderOptions)
    image_encoder: ImageEncoderOptions = field(default_factory=ImageEncoderOptions)


@dataclass(frozen=True)
class PretrainOptions:
    """pretrain: the contrastive pre-training."""

    epochs: int = default_of("pretrain.epochs")
    batch_size: int = default_of("pretrain.batch_size")
    lr: float = default_of("pretrain.lr")
    weight_decay: float = default_of("pretrain.weight_decay")
    warmup_fraction: float = default_of("pretrain.warmup_fraction")
    init_temperature: float = default_of("pretrain.init_temperature")
    keep_by: str = default_of("pretrain.keep_by")
    patience: int | None = default_of("pretrain.patience")
    accumulate: int = default_of("pretrain.accumulate")
    augment: float = default_of("pretrain.augment")
    augment_shift: float = default_of("pretrain.augment_shift")
    gene_dropout: float = default_of("pretrain.gene_dropout")
    checkpoint_every: int = default_of("pretrain.checkpoint_every")
    num_workers: int = default_of("pretrain.num_workers")
    device: str = default_of("pretrain.device")
    devices: int = default_of("pretrain.devices")
    num_nodes: int = default_of("pretrain.num_nodes")
    # the job's Snakemake threads (common.smk), left out of --settings: the stage gets --threads
    threads: int | None = default_of("pretrain.threads")
    precision: str = default_of("pretrain.precision")
    seeds: tuple[int, ...] | None = default_of("pretrain.seeds")


@dataclass(frozen=True)
class UNetOptions:
    """finetune.unet: the MONAI U-Net baseline."""

    channels: tuple[int, ...] = default_of("finetune.unet.channels")
    strides: tuple[int, ...] = default_of("finetune.unet.strides")
    num_res_units: int = default_of("finetune.unet.num_res_units")
    lr: float = default_of("finetune.unet.lr")
    norm: str = default_of("finetune.unet.norm")


@dataclass(frozen=True)
class FinetuneOptions:
    """finetune: segmentation fine-tuning of every variant."""

    variants: tuple[str, ...] = default_of("finetune.variants")
    pretrained: str | None = default_of("finetune.pretrained")
    seeds: tuple[int, ...] | None = default_of("finetune.seeds")
    fusion: str = default_of("finetune.fusion")
    decoder_channels: int = default_of("finetune.decoder_channels")
    unet: UNetOptions = field(default_factory=UNetOptions)
    epochs: int = default_of("finetune.epochs")
    batch_size: int = default_of("finetune.batch_size")
    lr: float = default_of("finetune.lr")
    weight_decay: float = default_of("finetune.weight_decay")
    fusion_lr_scale: float = default_of("finetune.fusion_lr_scale")
    freeze: str = default_of("finetune.freeze")
    device: str = default_of("finetune.device")
    on_failure: str = default_of("finetune.on_failure")


@dataclass(frozen=True)
class EvaluateOptions:
    """evaluate: test-split scoring and the report's intervals."""

    bootstrap: int = default_of("evaluate.bootstrap")
    threshold: float = default_of("evaluate.threshold")


@dataclass(frozen=True)
class PredictOptions:
    """predict: a variant's bundle applied to the new patients of a sample sheet."""

    samples: str | None = default_of("predict.samples")
    variant: str = default_of("predict.variant")


@dataclass(frozen=True)
class Config:
    """The whole config (what `snakemake` validated), typed."""

    cohort: str = default_of("cohort")
    source: str = default_of("source")
    seed: int = default_of("seed")
    sources: SourcesOptions = field(default_factory=SourcesOptions)
    synthetic: SyntheticOptions = field(default_factory=SyntheticOptions)
    imaging: ImagingOptions = field(default_factory=ImagingOptions)
    splits: SplitsOptions = field(default_factory=SplitsOptions)
    expression: ExpressionOptions = field(default_factory=ExpressionOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    pretrain: PretrainOptions = field(default_factory=PretrainOptions)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)
    predict: PredictOptions = field(default_factory=PredictOptions)


# --- what each stage's rule passes with --settings ------------------------------------------
# A stage's settings hold the config sections its stage reads, all of which its rule passes
# (workflow/rules/*.smk, `settings(...)`), so that changing one of them reruns the stage.


def _stage(name: str, reader: str, *sections: str) -> type:
    """A frozen dataclass of `sections`, each typed as in Config."""
    types = typing.get_type_hints(Config)
    cls = dataclasses.make_dataclass(name, [(key, types[key]) for key in sections], frozen=True)
    cls.__doc__ = f"What {reader} reads: the config sections {', '.join(sections)}."
    cls.__module__ = __name__
    return cls


SynthesizeSettings = _stage("SynthesizeSettings", "`mgi synthesize`", "synthetic", "seed")
SourcesSettings = _stage("SourcesSettings", "`mgi acquire gdc-download` and `gtf`", "sources")
AcquireSettings = _stage("AcquireSettings", "`mgi acquire gdc-query`, `images` and `local`",
                         "sources", "imaging")
SequenceSettings = _stage("SequenceSettings", "`mgi sequences`", "expression")
# the seed samples slide tiles and the stain reference's tiles
ImagingSettings = _stage("ImagingSettings", "`mgi image` and `mgi stain-reference`", "imaging",
                         "seed")
SplitSettings = _stage("SplitSettings", "`mgi splits`", "splits", "seed")
PretrainSettings = _stage("PretrainSettings", "`mgi pretrain`", "model", "pretrain", "imaging",
                          "expression", "seed")
# also what a fine-tuned checkpoint stores to rebuild its network
FinetuneSettings = _stage("FinetuneSettings", "`mgi finetune`", "model", "finetune", "imaging",
                          "expression", "seed")
EvaluateSettings = _stage("EvaluateSettings", "`mgi evaluate`", "evaluate")
ReportSettings = _stage("ReportSettings", "`mgi report`", "evaluate", "finetune", "splits",
                        "seed")


T = TypeVar("T")


def build(cls: type[T], mapping: typing.Mapping[str, Any] | None, *, where: str = "") -> T:
    """An options dataclass from a mapping: keys it lacks take the schema's default, nested
    sections are built alike, lists become tuples; an unknown key or a value the schema rejects
    raises ConfigError naming the key's path."""
    mapping = dict(mapping or {})
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else f"; expected one of {sorted(known)}"
        raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in mapping.items():
        path = _join(where, name)
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: expected a section (a mapping), got {value!r}")
            values[name] = build(kind, value, where=path)
        else:
            _check_value(path, value)
            values[name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def stage_settings(cls: type[T], settings: str | typing.Mapping[str, Any]) -> T:
    """A stage's `*Settings` from the `--settings` JSON (or a mapping) of its rule, which must
    hold every section the stage reads (sections it does not read are left out)."""
    if isinstance(settings, str):
        try:
            settings = json.loads(settings)
        except json.JSONDecodeError as err:
            raise ConfigError(f"--settings: not valid JSON ({err})") from err
    if not isinstance(settings, typing.Mapping):
        raise ConfigError("--settings: expected a JSON object of config sections")
    expected = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    missing = [key for key in expected if key not in settings]
    if missing:
        raise ConfigError(
            f"--settings: no {missing} section; {cls.__name__} reads {expected} (the rule "
            "must pass every section its stage reads, so that changing one reruns it)")
    return build(cls, {key: settings[key] for key in expected})


def as_dict(options: object) -> dict[str, Any]:
    """Options (or a mapping of them) as plain JSON-able values, e.g. to store in a checkpoint."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)  # type: ignore[arg-type]
        raise TypeError(f"{type(value).__name__} is not an options value")

    return json.loads(json.dumps(options, default=plain))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_value(path: str, value: Any) -> None:
    """Validate one value against its schema node (type, enum, bounds, items)."""
    import jsonschema

    try:
        _validator(path).validate(value)
    except jsonschema.ValidationError as err:
        raise ConfigError(f"{path}: {err.message}") from None


@functools.cache
def _validator(path: str) -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(schema_node(path))
