"""Config validation, path helpers and input functions shared by every stage."""

import copy
import functools
import json
import os
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import min_version

from config_check import check_config  # workflow/rules/config_check.py

min_version("9.0")


check_config(config, workflow.source_path("../schemas/config.schema.yaml"), workflow)

# The package's facts the rules need (variants, image table columns, results layout), generated
# by `python -m mgi.registry` from mgi.variants and mgi.layout: Snakemake cannot import mgi.
with open(workflow.source_path("../registry.json")) as _handle:
    REGISTRY = json.load(_handle)

COHORT = config["cohort"]
# GENCODE GTF (gene positions): written by the demo, fetched from the GDC reference files,
# or, for source local, the file sources.local.gtf names (read in place)
GENE_ANNOTATION = f"data/{COHORT}/raw/reference/gencode.annotation.gtf.gz"
if config["source"] == "local":
    GENE_ANNOTATION = config["sources"]["local"]["gtf"]
    if config["expression"]["order"] == "genomic" and not GENE_ANNOTATION:
        raise WorkflowError(
            "expression.order: 'genomic' needs gene positions; source local has none unless "
            "sources.local.gtf names a GENCODE GTF of the expression's genes (or choose "
            "expression.order rank or fixed)"
        )
    if not config["sources"]["local"]["samples"]:
        raise WorkflowError(
            "sources.local.samples: not set; source local needs a sample sheet (TSV, one row "
            "per patient; see cohorts/local-example.yaml)"
        )
STAIN_METHOD = config["imaging"]["wsi"]["stain"]["method"]
STAIN_REFERENCE = f"results/{COHORT}/images/stain_reference.json"
MODALITY = config["imaging"]["modality"]
ENV = "../../envs/mgi.yaml"
# Variants train side by side: on a small machine one thread each beats two in turn.
VARIANT_THREADS = max(1, workflow.cores // len(config["finetune"]["variants"]))


def raw(path):
    """Path under data/{cohort}/raw/ (an absolute path, images read in place, as it is)."""
    return os.path.join(f"data/{COHORT}/raw", path)


def results(path):
    """Path under results/{cohort}/."""
    return f"results/{COHORT}/{path}"


def logs(path):
    """Path under logs/{cohort}/."""
    return f"logs/{COHORT}/{path}"


# Keys that shape the DAG (how many folds and seeds) or how a job runs, not what a stage computes:
# left out of the stages' settings, so that adding a seed does not rerun the runs that exist.
DESIGN_KEYS = {
    "splits": ("folds", "stratify"),
    "pretrain": ("seeds", "threads"),
    "finetune": ("seeds",),
}
# pretrain.threads: a pre-training job's threads (null: every core given to Snakemake)
PRETRAIN_THREADS = min(config["pretrain"]["threads"] or workflow.cores, workflow.cores)


def settings(*keys, design=False, seed=None):
    """Config sections as compact JSON, passed to `mgi` as one argument (and a rerun trigger);
    without the DESIGN_KEYS unless `design`, with the top-level seed replaced by `seed`.
    """
    chosen = {key: copy.deepcopy(config[key]) for key in keys}
    if not design:
        for key, names in DESIGN_KEYS.items():
            for name in names if key in chosen else ():
                chosen[key].pop(name, None)
    if seed is not None:
        chosen["seed"] = int(seed)
    return json.dumps(chosen, sort_keys=True)


def seeded_settings(*keys):
    """A params function: settings(*keys) with the run's seed (wildcard `seed`)."""
    return lambda wildcards: settings(*keys, seed=wildcards.seed)


def image_table():
    """Rows of the acquired image table (images.tsv), read once per file version.

    A cluster job plans only itself, so there the checkpoint never counts as done and its
    input functions would see placeholders (snakemake/snakemake#55); the job was submitted
    after the checkpoint ran, so it reads the table where the checkpoint wrote it.
    """
    if workflow.remote_exec:
        path = raw("images.tsv")
    else:
        path = getattr(checkpoints, IMAGE_TABLE).get().output.images
    return _read_image_table(path, os.path.getmtime(path))


@functools.lru_cache(maxsize=4)
def _read_image_table(path, mtime):
    with open(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        missing = [c for c in REGISTRY["image_table_columns"] if c not in header]
        if missing:
            raise ValueError(
                f"{path}: no column(s) {missing}; expected {REGISTRY['image_table_columns']}"
            )
        return tuple(
            dict(zip(header, line.rstrip("\n").split("\t"))) for line in handle
        )


def image_ids(wildcards):
    """Ids of the cohort's images of the configured modality."""
    return sorted(
        row["image_id"] for row in image_table() if row["modality"] == MODALITY
    )


def image_banks(wildcards):
    """Every image bank of the cohort (failed images included: their bank says so)."""
    return expand(results("images/{image_id}.h5"), image_id=image_ids(wildcards))


def image_qc_rows(wildcards):
    """Every per-image QC row of the cohort."""
    return expand(results("images/qc/{image_id}.tsv"), image_id=image_ids(wildcards))


def image_row(image_id):
    """The image table's row of one image."""
    for row in image_table():
        if row["image_id"] == image_id:
            return row
    raise ValueError(f"{raw('images.tsv')}: no image with image_id {image_id!r}")


def image_inputs(wildcards):
    """Raw inputs of one image: the series folder or slide file, and its masks where it has any."""
    row = image_row(wildcards.image_id)
    inputs = {"image": raw(row["path"]), "table": raw("images.tsv")}
    if row.get("mask_path"):
        inputs["mask"] = raw(row["mask_path"])
    if row["modality"] == "wsi" and STAIN_METHOD != "none":
        inputs["stain"] = STAIN_REFERENCE
    return inputs


def slide_files(wildcards):
    """Inputs of the stain reference: the image table, its slides, the reference tile if set."""
    inputs = {"table": raw("images.tsv")}
    slides = [row["path"] for row in image_table() if row["modality"] == "wsi"]
    inputs["slides"] = [raw(path) for path in slides]
    tile = config["imaging"]["wsi"]["stain"].get("reference_tile")
    if tile:
        inputs["reference_tile"] = tile
    return inputs


def stain_option(wildcards, input):
    """`--stain-reference <json>` when slides are stain-normalised, else nothing."""
    return f"--stain-reference {input.stain}" if "stain" in input.keys() else ""


def cohort_results(wildcards, input):
    """A params function: results/{cohort}/, the folder above the input expression/encoding.npz."""
    return os.path.dirname(os.path.dirname(input.encoding))


def bundle_inputs(wildcards):
    """Inputs of a variant's bundle: its checkpoint, the encoding, the stain reference if used,
    and the pre-training it started from (variants that start from pre-training)."""
    inputs = {
        "model": results(f"finetune/{wildcards.variant}/model.pt"),
        "encoding": results("expression/encoding.npz"),
    }
    pretrained = pretraining_of(wildcards.variant)
    if pretrained:
        inputs["pretrain"] = pretrained
    if MODALITY == "wsi" and STAIN_METHOD != "none":
        inputs["stain"] = STAIN_REFERENCE
    return inputs


def bundle_pretrain_option(wildcards, input):
    """`--pretrain <checkpoint>` for a bundle of a variant that starts from pre-training."""
    if "pretrain" in input.keys():
        return f"--pretrain {shlex.quote(input.pretrain)}"
    return ""


def predict_sheet(wildcards):
    """The sample sheet of the new patients (predict.samples); an error when it is not set."""
    sheet = config["predict"]["samples"]
    if not sheet:
        raise WorkflowError(
            "predict.samples: not set; predictions for new patients need a sample sheet "
            "(TSV: case_id, expression, image; see README.md, 'Using a trained model on new "
            "patients')"
        )
    return sheet


def predict_targets():
    """volumes.tsv of predict.variant when predict.samples is set, else nothing."""
    if not config["predict"]["samples"]:
        return []
    return [results(f"predict/{config['predict']['variant']}/volumes.tsv")]


# model.gene_encoder.kind's enum; variant mgi_{kind} is the gene-encoder ablation of that kind
GENE_ENCODER_KINDS = tuple(REGISTRY["gene_encoder_kinds"])
PRETRAIN_SECTIONS = ("model", "pretrain", "imaging", "expression", "seed")


def own_pretraining_kind(variant):
    """The gene encoder kind of a variant's own pre-training (pretrain/ablation/{kind}/) where
    it is not model.gene_encoder.kind, else None."""
    spec = REGISTRY["variants"][variant]
    configured = config["model"]["gene_encoder"]["kind"]
    kind = spec["gene_encoder"] or configured
    return kind if spec["pretrained"] and kind != configured else None


# finetune.pretrained: another cohort's pre-training, read in place (that cohort's pretrain/
# folder, and the sequence encoding its gene_sequences wrote beside it), or an exported bundle
# (.mgi), whose pretrain.pt and encoding.npz unbundle_pretrained writes to pretrained/; else
# this cohort's. A bundle carries no pre-training curves or retrieval: no report then.
PRETRAINED = config["finetune"]["pretrained"]
BUNDLED = bool(PRETRAINED) and PRETRAINED.endswith(".mgi")
PRETRAIN_FILES = {
    "model.pt": results("pretrain/model.pt"),
    "history.tsv": results("pretrain/history.tsv"),
    "retrieval.json": results("pretrain/retrieval.json"),
}
PRETRAINED_ENCODING = None
if PRETRAINED:
    if not PRETRAINED.endswith(".pt") and not BUNDLED:
        raise WorkflowError(
            f"finetune.pretrained: {PRETRAINED!r}; expected the path of another cohort's "
            "results/{cohort}/pretrain/model.pt or of an exported bundle (.mgi, mgi export)"
        )
    if os.path.abspath(PRETRAINED) == os.path.abspath(results("pretrain/model.pt")):
        raise WorkflowError(
            f"finetune.pretrained: {PRETRAINED!r} is this cohort's own pre-training; set it "
            "to null (the default) to pre-train this cohort, or name another cohort's"
        )
    _own = [v for v in config["finetune"]["variants"] if own_pretraining_kind(v)]
    if _own:
        raise WorkflowError(
            f"finetune.variants: {_own} need a pre-training with their own gene encoder "
            f"(pretrain/ablation/{{kind}}/), which finetune.pretrained {PRETRAINED!r} does not "
            "provide; remove them from finetune.variants, or set finetune.pretrained to null"
        )
    if BUNDLED:
        PRETRAIN_FILES = {"model.pt": results("pretrained/model.pt")}
        PRETRAINED_ENCODING = results("pretrained/encoding.npz")
    else:
        _folder = os.path.dirname(PRETRAINED)
        PRETRAIN_FILES = {name: os.path.join(_folder, name) for name in PRETRAIN_FILES}
        PRETRAINED_ENCODING = os.path.join(
            os.path.dirname(_folder), "expression", "encoding.npz"
        )


def pretrain_file(name):
    """File `name` (model.pt, history.tsv, retrieval.json) of the pre-training fine-tuning
    starts from: this cohort's pretrain/, finetune.pretrained's folder, or (model.pt only) the
    bundle's, unbundled to pretrained/."""
    if name not in PRETRAIN_FILES:
        raise WorkflowError(
            f"finetune.pretrained {PRETRAINED!r} is a bundle: it carries no pre-training "
            f"{name} (curves, retrieval), so there is no report; the default target is the "
            "variants' evaluation (finetune/{variant}/status.json) and the gene attribution"
        )
    return PRETRAIN_FILES[name]


def report_targets():
    """The report and its metrics (with folds and seeds also the runs' table); with a bundle
    (no pre-training curves or retrieval), the variants' evaluation and the gene attribution.
    """
    if BUNDLED:
        return variant_files("status.json") + [results("report/gene_attribution.tsv")]
    runs = [layout("runs")] if REPEATED else []
    return [results("report/report.html"), results("report/metrics.json")] + runs


def pretraining_of(variant):
    """The pre-trained checkpoint a variant starts from, or None for the scratch variants
    (mgi.variants.pretraining_of: a gene-encoder ablation whose kind is not
    model.gene_encoder.kind starts from pretrain/ablation/{kind}/; finetune.pretrained
    replaces this cohort's pre-training)."""
    if not REGISTRY["variants"][variant]["pretrained"]:
        return None
    kind = own_pretraining_kind(variant)
    if kind:
        return results(f"pretrain/ablation/{kind}/model.pt")
    return pretrain_file("model.pt")


def variant_files(name):
    """finetune/{variant}/{name} of every configured variant, in the config's order."""
    return expand(
        results("finetune/{variant}/{name}"),
        variant=config["finetune"]["variants"],
        name=name,
    )


def variant_inputs(wildcards):
    """Inputs of one fine-tuning variant: pre-trained weights only for variants that use them."""
    inputs = {
        "sequences": results("expression/sequences.npz"),
        "splits": results("splits.tsv"),
        "qc": results("images/qc.tsv"),
    }
    pretrained = pretraining_of(wildcards.variant)
    if pretrained:
        inputs["pretrained"] = pretrained
    return inputs


def ablation_settings(wildcards):
    """The pre-training settings (as `settings(*PRETRAIN_SECTIONS)`) with gene encoder {kind}."""
    seed = wildcards.get("seed")  # a fold's pre-training of one seed (crossval.smk)
    sections = json.loads(settings(*PRETRAIN_SECTIONS, seed=seed))
    sections["model"]["gene_encoder"]["kind"] = wildcards.kind
    return json.dumps(sections, sort_keys=True)


def pretrained_option(wildcards, input):
    """`--pretrained <checkpoint>` for variants that start from pre-training, else nothing."""
    return f"--pretrained {input.pretrained}" if "pretrained" in input.keys() else ""


def sequence_inputs(wildcards):
    """Inputs of the gene sequences: the GTF only for the genomic order, the gene list if set,
    the pre-training cohort's encoding with finetune.pretrained."""
    inputs = {
        "h5ad": results("expression/expression.h5ad"),
        "splits": results("splits.tsv"),
    }
    if config["expression"]["order"] == "genomic":
        inputs["gtf"] = GENE_ANNOTATION
    if config["expression"].get("gene_list"):
        inputs["gene_list"] = config["expression"]["gene_list"]
    if PRETRAINED_ENCODING:
        inputs["from_encoding"] = PRETRAINED_ENCODING
    return inputs


def encoding_option(wildcards, input):
    """`--from-encoding <npz>` when the sequences take the pre-training cohort's encoding."""
    if "from_encoding" in input.keys():
        return f"--from-encoding {shlex.quote(input.from_encoding)}"
    return ""


def gtf_option(wildcards, input):
    """`--gtf <file>` when the sequences read gene positions, else nothing."""
    return f"--gtf {input.gtf}" if "gtf" in input.keys() else ""


def planted_genes(wildcards):
    """The synthetic cohort's planted genes (checked against the gene attribution), else nothing."""
    if config["source"] == "synthetic":
        return {"planted": raw("synthetic_genes.tsv")}
    return {}


def planted_option(wildcards, input):
    """`--planted <tsv>` for a synthetic cohort, else nothing."""
    return f"--planted {input.planted}" if "planted" in input.keys() else ""


def gtf_settings():
    """The GDC keys the GTF download reads (so that other source keys do not refetch it)."""
    gdc = config["sources"]["gdc"]
    keys = ("api_url", "token_env", "gtf")
    return json.dumps(
        {"sources": {"gdc": {key: gdc[key] for key in keys}}}, sort_keys=True
    )


def matrix_input(wildcards):
    """Source local with sources.local.matrix: the matrix (the expression's input), else nothing."""
    matrix = config["sources"]["local"]["matrix"]
    return {"matrix": matrix} if config["source"] == "local" and matrix else {}


def matrix_option(wildcards, input):
    """`--matrix <file>` when the expression comes from a matrix, else nothing."""
    return f"--matrix {shlex.quote(input.matrix)}" if "matrix" in input.keys() else ""


def given_splits(wildcards):
    """Source local: the sample sheet's splits (empty when it gives none), else nothing."""
    return {"given": raw("given_splits.tsv")} if config["source"] == "local" else {}


def given_option(wildcards, input):
    """`--given <tsv>` for source local, else nothing."""
    return f"--given {input.given}" if "given" in input.keys() else ""


def value_layers():
    """Value layers the expression matrix keeps besides the counts (TPM, and what normalize reads)."""
    normalize = config["expression"]["normalize"]
    return " ".join(["tpm"] + (["fpkm_uq"] if normalize == "fpkm_uq" else []))


def raw_dir(wildcards, input):
    """A params function: data/{cohort}/raw, where the image rules read raw files from.

    Not folder_of("table", of="input"): Snakemake (9.27) hands that an input without the
    unpacked names when one image's bank is the requested target. A function of `input`, so
    Snakemake's params record (and the rerun triggers of existing banks) stays as it was.
    """
    return os.path.dirname(raw("images.tsv"))


def folder_of(key, *, of="output"):
    """A params function: the folder holding the rule's input or output file `key`."""

    def folder(wildcards, input, output):
        return os.path.dirname((input if of == "input" else output)[key])

    return folder


# --- folds and seeds (crossval.smk) ---------------------------------------------------------
# splits.folds > 1 or several seeds: every (variant, fold, seed) is its own fine-tuning job
# under cv/fold{fold}/, each fold with its own splits, sequences and pre-training; the report
# pools them. Otherwise the one split's results/{cohort}/finetune/{variant}/ as ever.
FOLDS = config["splits"]["folds"]
SEEDS = config["finetune"]["seeds"] or [config["seed"]]
PRETRAIN_SEEDS = config["pretrain"]["seeds"]
REPEATED = FOLDS > 1 or len(SEEDS) > 1 or bool(PRETRAIN_SEEDS)
if PRETRAIN_SEEDS and sorted(PRETRAIN_SEEDS) != sorted(SEEDS):
    raise WorkflowError(
        f"pretrain.seeds: {PRETRAIN_SEEDS}; each fine-tuning seed starts from the pre-training "
        f"of the same seed, so it must list the seeds of finetune.seeds ({SEEDS}), or be null "
        "(one pre-training per fold)"
    )
if REPEATED and PRETRAINED:
    raise WorkflowError(
        f"finetune.pretrained: {PRETRAINED!r} with splits.folds {FOLDS} and seeds {SEEDS}: a "
        "fold's pre-training must not see its test patients, which another cohort's "
        "pre-training cannot promise (it may hold this cohort's patients); set "
        "finetune.pretrained to null to pre-train each fold, or use one split and one seed"
    )


class _Keep(dict):
    """str.format_map's mapping that leaves a wildcard it is not given as {name}."""

    def __missing__(self, key):
        return f"{{{key}}}"


def layout(name, **wildcards):
    """results/{cohort}/ + mgi.layout.RESULTS[name], with the given wildcards filled in and
    the others left as Snakemake wildcards."""
    return results(REGISTRY["results"][name].format_map(_Keep(wildcards)))


def pretrain_seed_of(seed):
    """The seed of the pre-training a fine-tuning seed starts from (its own with
    pretrain.seeds, else the top-level seed: one pre-training per fold)."""
    return int(seed) if PRETRAIN_SEEDS else config["seed"]


def fold_pretraining_of(variant, fold, seed):
    """The checkpoint run (variant, fold, seed) starts from, or None for scratch variants."""
    if not REGISTRY["variants"][variant]["pretrained"]:
        return None
    seed = pretrain_seed_of(seed)
    kind = own_pretraining_kind(variant)
    if kind:
        return layout("fold_ablation_model", fold=fold, kind=kind, seed=seed)
    return layout("fold_pretrain_model", fold=fold, seed=seed)


def run_inputs(wildcards):
    """Inputs of one run: the fold's sequences and splits, its pre-training where used."""
    inputs = {
        "sequences": layout("fold_sequences", fold=wildcards.fold),
        "splits": layout("fold_splits", fold=wildcards.fold),
        "qc": results("images/qc.tsv"),
    }
    pretrained = fold_pretraining_of(wildcards.variant, wildcards.fold, wildcards.seed)
    if pretrained:
        inputs["pretrained"] = pretrained
    return inputs


def strata_input(wildcards):
    """clinical.tsv when the folds are stratified by one of its columns, else nothing."""
    stratified = FOLDS > 1 and config["splits"]["stratify"]
    return {"clinical": raw("clinical.tsv")} if stratified else {}


def strata_option(wildcards, input):
    """`--clinical <tsv>` when the folds are stratified, else nothing."""
    return f"--clinical {input.clinical}" if "clinical" in input.keys() else ""


def fold_sequence_inputs(wildcards):
    """Inputs of a fold's gene sequences: as sequence_inputs, with the fold's splits."""
    inputs = sequence_inputs(wildcards)
    inputs["splits"] = layout("fold_splits", fold=wildcards.fold)
    return inputs


RUNS = [
    (variant, fold, seed)
    for variant in config["finetune"]["variants"]
    for fold in range(FOLDS)
    for seed in SEEDS
]
PRETRAININGS = [
    (fold, pretrain_seed_of(seed)) for fold in range(FOLDS) for seed in SEEDS
]
PRETRAININGS = sorted(set(PRETRAININGS))
# the runs and pre-trainings as `mgi report` / `mgi runs` take them (variant:fold:seed, fold:seed)
RUN_KEYS = " ".join(f"{v}:{f}:{s}" for v, f, s in RUNS) if REPEATED else ""
PRETRAINING_KEYS = " ".join(f"{f}:{s}" for f, s in PRETRAININGS) if REPEATED else ""
# the report's curves, retrieval, examples and attribution: the first run's (fold 0)
PRIMARY = {"fold": 0, "seed": SEEDS[0]}


def run_files(name):
    """Layout file `name` (run_test_patients, ...) of every run, in RUNS order."""
    return [layout(name, variant=v, fold=f, seed=s) for v, f, s in RUNS]


def fold_retrievals():
    """retrieval.json of every fold's pre-training, in PRETRAININGS order."""
    return [layout("fold_retrieval", fold=f, seed=s) for f, s in PRETRAININGS]


def detail_file(name):
    """A file the report's detail sections and the attribution read: this split's own, or
    with folds and seeds the first run's (PRIMARY). `name`: sequences, vocab, splits,
    pretrain_model, pretrain_history or retrieval."""
    if not REPEATED:
        pretraining = {
            "pretrain_model": "model.pt",
            "pretrain_history": "history.tsv",
            "retrieval": "retrieval.json",
        }
        if name in pretraining:
            return pretrain_file(pretraining[name])
        return layout(name)
    fold, seed = PRIMARY["fold"], pretrain_seed_of(PRIMARY["seed"])
    return layout(f"fold_{name}", fold=fold, seed=seed)


def detail_variant_files(name):
    """Layout file `name` (test_patients, ...) of every variant for the report's detail
    sections: this split's, or with folds and seeds the first run's (PRIMARY)."""
    variants = config["finetune"]["variants"]
    if not REPEATED:
        return [layout(name, variant=v) for v in variants]
    return [layout(f"run_{name}", variant=v, **PRIMARY) for v in variants]


def detail_input(name):
    """An input function: detail_file(name), asked only when the rule is planned."""
    return lambda wildcards: detail_file(name)
