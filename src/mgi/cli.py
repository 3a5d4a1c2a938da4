"""`mgi <stage> ...`: the command line the Snakemake rules call. Thin: parse, call the stage."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mgi.errors import MgiError
from mgi.options import (
    EvaluateOptions,
    EvaluateSettings,
    FinetuneSettings,
    ImagingSettings,
    PretrainSettings,
    ReportSettings,
    SequenceSettings,
    SplitSettings,
    SynthesizeSettings,
    as_dict,
    stage_settings,
)

log = logging.getLogger("mgi")


def _synthesize(args: argparse.Namespace) -> None:
    from mgi.acquire.synthetic import SyntheticCohortConfig, write_cohort

    settings = stage_settings(SynthesizeSettings, args.settings)
    config = SyntheticCohortConfig(**as_dict(settings.synthetic), seed=settings.seed)
    manifest = write_cohort(Path(args.out_dir), config=config)
    log.info("wrote the synthetic cohort, manifest %s", manifest)


def _expression(args: argparse.Namespace) -> None:
    from mgi.expression.anndata_build import build_expression, write_h5ad

    adata = build_expression(
        Path(args.manifest),
        raw_dir=Path(args.raw_dir),
        clinical_path=Path(args.clinical),
        layers=args.layers,
        duplicates=args.duplicates,
        matrix=Path(args.matrix) if args.matrix else None,
    )
    write_h5ad(adata, Path(args.out))
    log.info("expression matrix: %d cases x %d genes -> %s", adata.n_obs, adata.n_vars, args.out)


def _sequences(args: argparse.Namespace) -> None:
    import anndata

    from mgi.expression.encoding import SequenceEncoding
    from mgi.expression.gtf import check_gene_model, read_gene_positions
    from mgi.expression.order import read_gene_list
    from mgi.expression.tokens import build_sequences, encode_sequences, write_sequences
    from mgi.io import read_tsv

    config = stage_settings(SequenceSettings, args.settings).expression
    splits = read_tsv(args.splits, required=["case_id", "split"])
    splits = splits[splits["split"].isin(["train", "val", "test"])]
    adata = anndata.read_h5ad(args.expression)
    positions = None
    if config.order == "genomic" and not args.from_encoding:
        if not args.gtf:
            raise MgiError("mgi sequences: expression.order 'genomic' needs --gtf <GENCODE GTF>")
        check_gene_model(args.gtf, str(adata.uns.get("gene_model", "")))
        positions = read_gene_positions(args.gtf)
    if args.from_encoding:
        encoding = SequenceEncoding.load(args.from_encoding)
        log.info("encoding %s (fitted elsewhere) applied; expression settings of the encoding "
                 "used", args.from_encoding)
        seqs = encode_sequences(adata, splits, encoding=encoding)
    else:
        gene_list = read_gene_list(config.gene_list) if config.gene_list else None
        seqs = build_sequences(
            adata, splits, config=config, positions=positions, gene_list=gene_list
        )
    write_sequences(seqs, sequences_path=Path(args.sequences), vocab_path=Path(args.vocab))
    if args.encoding:
        seqs.encoding.save(args.encoding)
    log.info("%d sequences of %d tokens, vocabulary %d", *seqs.token_ids.shape, len(seqs.vocab))


def _image(args: argparse.Namespace) -> None:
    from mgi.imaging.run import process_image

    row = process_image(
        images_table=Path(args.images),
        image_id=args.image_id,
        raw_dir=Path(args.raw_dir),
        settings=stage_settings(ImagingSettings, args.settings),
        bank_path=Path(args.bank),
        qc_path=Path(args.qc),
        thumbnail_path=Path(args.thumbnail) if args.thumbnail else None,
        stain_reference=Path(args.stain_reference) if args.stain_reference else None,
        threads=args.threads,
    )
    log.info("image %s: %s %s", args.image_id, row["status"], row.get("reason", ""))


def _stain_reference(args: argparse.Namespace) -> None:
    from mgi.imaging.run import fit_stain_reference

    fit_stain_reference(images_table=Path(args.images), raw_dir=Path(args.raw_dir),
                        settings=stage_settings(ImagingSettings, args.settings),
                        out_path=Path(args.out))


def _qc_merge(args: argparse.Namespace) -> None:
    from mgi.imaging.qc import merge_qc
    from mgi.io import write_tsv

    table = merge_qc([Path(p) for p in args.rows])
    write_tsv(table, args.out)
    failed = table[table["status"] != "ok"]
    for _, row in failed.iterrows():
        log.warning("image %s failed: %s", row["image_id"], row["reason"])
    log.info("%d images, %d ok, %d failed", len(table), len(table) - len(failed), len(failed))


def _splits(args: argparse.Namespace) -> None:
    from mgi.io import write_tsv
    from mgi.train.splits import make_splits

    settings = stage_settings(SplitSettings, args.settings)
    splits = make_splits(
        expression_path=Path(args.expression),
        qc_path=Path(args.qc),
        val_fraction=settings.splits.val_fraction,
        test_fraction=settings.splits.test_fraction,
        seed=settings.seed,
        given_path=Path(args.given) if args.given else None,
    )
    write_tsv(splits, args.out)
    log.info("splits: %s", splits["split"].value_counts().to_dict())


def _folds(args: argparse.Namespace) -> None:
    from mgi.io import read_tsv, write_tsv
    from mgi.train.folds import make_folds, read_strata
    from mgi.train.splits import paired_patients

    settings = stage_settings(SplitSettings, args.settings)
    folds = settings.splits.folds
    if len(args.out) != folds:
        raise MgiError(f"mgi folds: {len(args.out)} --out file(s) for splits.folds {folds}; "
                       "expected one splits table per fold")
    if folds > 1 and args.given and not read_tsv(args.given).empty:
        raise MgiError(f"{args.given}: the sample sheet fixes the splits (its split column), so "
                       f"splits.folds {folds} cannot deal its own; remove the column or set "
                       "splits.folds to 1")
    paired, unpaired = paired_patients(expression_path=Path(args.expression),
                                       qc_path=Path(args.qc))
    strata = None
    if settings.splits.stratify and folds > 1:
        if not args.clinical:
            raise MgiError(f"splits.stratify {settings.splits.stratify!r}: mgi folds needs "
                           "--clinical, the clinical table holding that column")
        strata = read_strata(Path(args.clinical), settings.splits.stratify, paired)
    assignment, splits = make_folds(
        paired=paired, unpaired=unpaired, folds=folds,
        val_fraction=settings.splits.val_fraction, seed=settings.seed, strata=strata,
        fixed_split=read_tsv(args.fixed_splits, required=["case_id", "split"]))
    write_tsv(assignment, args.folds)
    for table, path in zip(splits, args.out, strict=True):
        write_tsv(table, path)
    log.info("%d fold(s)%s: %s", folds, " (the fixed split)" if folds == 1 else "",
             [int((t["split"] == "test").sum()) for t in splits])


def _pretrain(args: argparse.Namespace) -> None:
    from mgi.train.launch import launch
    from mgi.train.pretrain import pretrain

    settings = stage_settings(PretrainSettings, args.settings)
    # Processes per node and nodes: the rule's resources (which a profile may raise) win over
    # pretrain.devices / pretrain.num_nodes; the options object then holds the layout that runs.
    layout = {key: value for key, value in
              (("devices", args.devices), ("num_nodes", args.num_nodes)) if value}
    settings = dataclasses.replace(settings,
                                   pretrain=dataclasses.replace(settings.pretrain, **layout))
    launch([sys.executable, "-m", "mgi.cli", *args.argv],
           processes_per_node=settings.pretrain.devices, nodes=settings.pretrain.num_nodes,
           threads=args.threads)
    pretrain(
        sequences_path=Path(args.sequences),
        splits_path=Path(args.splits),
        qc_path=Path(args.qc),
        settings=settings,
        out_dir=Path(args.out_dir),
        threads=args.threads,
    )


def _finetune(args: argparse.Namespace) -> None:
    from mgi.train.finetune import finetune

    finetune(
        variant=args.variant,
        sequences_path=Path(args.sequences),
        splits_path=Path(args.splits),
        qc_path=Path(args.qc),
        pretrained_path=Path(args.pretrained) if args.pretrained else None,
        settings=stage_settings(FinetuneSettings, args.settings),
        out_dir=Path(args.out_dir),
        threads=args.threads,
    )


def _evaluate(args: argparse.Namespace) -> None:
    from mgi.evaluate.segmentation import evaluate_variant

    evaluate_variant(
        model_path=Path(args.model),
        sequences_path=Path(args.sequences),
        splits_path=Path(args.splits),
        qc_path=Path(args.qc),
        settings=stage_settings(EvaluateSettings, args.settings),
        patients_path=Path(args.patients),
        slices_path=Path(args.slices),
        predictions_path=Path(args.predictions),
        predictions_dir=Path(args.predictions_dir) if args.predictions_dir else None,
        status_path=Path(args.status) if args.status else None,
        threads=args.threads,
    )


def _report(args: argparse.Namespace) -> None:
    from mgi.evaluate.crossval import RunFiles, parse_run_key
    from mgi.evaluate.report import ReportInputs, VariantFiles, write_report

    per_variant = [args.patients, args.slices, args.predictions, args.status, args.histories]
    if any(len(files) != len(args.variants) for files in per_variant):
        raise MgiError("mgi report: --patients, --slices, --predictions, --status and "
                       "--histories need one file per variant of --variants, in its order")
    runs = []
    for i, key in enumerate(args.runs):
        variant, fold, seed = parse_run_key(key)
        runs.append(RunFiles(variant, fold, seed, *(Path(files[i]) for files in (
            args.run_patients, args.run_status, args.run_histories))))
    if any(len(files) != len(args.runs) for files in (args.run_patients, args.run_status,
                                                       args.run_histories)):
        raise MgiError("mgi report: --run-patients, --run-status and --run-histories need one "
                       "file per run of --runs, in its order")
    if len(args.fold_retrievals) != len(args.pretrainings):
        raise MgiError("mgi report: --fold-retrievals needs one file per --pretrainings key")
    fold_retrievals = {}
    for key, path in zip(args.pretrainings, args.fold_retrievals, strict=True):
        fold, seed = (int(x) for x in key.split(":"))
        fold_retrievals[(fold, seed)] = Path(path)
    inputs = ReportInputs(
        runs=tuple(runs), fold_retrievals=fold_retrievals,
        retrieval=Path(args.retrieval), pretrain_history=Path(args.pretrain_history),
        splits=Path(args.splits), qc=Path(args.qc),
        banks={Path(bank).stem: Path(bank) for bank in args.banks},
        variants={variant: VariantFiles(*(Path(files[i]) for files in per_variant))
                  for i, variant in enumerate(args.variants)},
        attribution=Path(args.attribution) if args.attribution else None,
        attribution_summary=(Path(args.attribution_summary) if args.attribution_summary
                             else None),
    )
    write_report(
        cohort=args.cohort,
        inputs=inputs,
        settings=stage_settings(ReportSettings, args.settings),
        metrics_path=Path(args.metrics),
        html_path=Path(args.html),
        figures_dir=Path(args.figures) if args.figures else None,
        patients_path=Path(args.test_patients) if args.test_patients else None,
    )


def _runs(args: argparse.Namespace) -> None:
    from mgi.evaluate.crossval import parse_run_key, runs_table
    from mgi.io import write_tsv

    if len(args.status) != len(args.runs):
        raise MgiError("mgi runs: --status needs one file per run of --runs, in its order")
    table = runs_table({parse_run_key(key): Path(status)
                        for key, status in zip(args.runs, args.status, strict=True)})
    write_tsv(table, args.out)
    failed = table[table["status"] != "ok"]
    log.info("%d runs, %d failed", len(table), len(failed))
    for row in failed.itertuples():
        log.warning("run %s fold %s seed %s failed: %s", row.variant, row.fold, row.seed,
                    row.error)


def _attribute(args: argparse.Namespace) -> None:
    from mgi.evaluate.attribution import gene_attribution

    gene_attribution(
        model_path=Path(args.model),
        sequences_path=Path(args.sequences),
        vocab_path=Path(args.vocab),
        splits_path=Path(args.splits),
        qc_path=Path(args.qc),
        table_path=Path(args.out),
        summary_path=Path(args.summary),
        planted_path=Path(args.planted) if args.planted else None,
        splits=args.split,
        n_steps=args.steps,
        threads=args.threads,
    )


def _export(args: argparse.Namespace) -> None:
    from mgi.bundle import export_bundle

    threshold = (args.threshold if args.threshold is not None
                 else EvaluateOptions().threshold)
    export_bundle(variant=args.variant, results_dir=Path(args.results), out_path=Path(args.out),
                  threshold=threshold,
                  pretrain_path=Path(args.pretrain) if args.pretrain else None)


def _unbundle(args: argparse.Namespace) -> None:
    from mgi.bundle import unbundle

    unbundle(bundle_path=Path(args.bundle), pretrain_out=Path(args.pretrain),
             encoding_out=Path(args.encoding))


def _predict(args: argparse.Namespace) -> None:
    from mgi.evaluate.predict import predict_patients

    predict_patients(bundle_path=Path(args.bundle), samples_path=Path(args.samples),
                     out_dir=Path(args.out), threads=args.threads)


def _acquire(args: argparse.Namespace) -> None:
    from mgi.acquire import remote

    remote.run(args.action, args)


def build_parser() -> argparse.ArgumentParser:
    """The `mgi` argument parser, one subcommand per workflow stage."""
    parser = argparse.ArgumentParser(prog="mgi", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], None], help: str):
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        return p

    p = command("synthesize", _synthesize, "write the embedded demo cohort")
    p.add_argument("--settings", required=True)
    p.add_argument("--out-dir", required=True)

    p = command("acquire", _acquire, "fetch a real cohort (GDC expression/slides, TCIA MRI)")
    p.add_argument("action", choices=["gdc-query", "gdc-download", "images", "gtf", "local"])
    p.add_argument("--settings", required=True)
    p.add_argument("--manifest")
    p.add_argument("--clinical")
    p.add_argument("--raw-dir")
    p.add_argument("--images")
    p.add_argument("--out", help="gtf: where the GENCODE GTF goes")

    p = command("expression", _expression, "expression files to an AnnData matrix")
    p.add_argument("--manifest", required=True)
    p.add_argument("--clinical", required=True)
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", nargs="*", default=["tpm"],
                   help="value layers besides the counts: tpm, fpkm, fpkm_uq")
    p.add_argument("--duplicates", default="choose", choices=["choose", "error"],
                   help="several profiles of a case: choose one by the manifest rule, or fail")
    p.add_argument("--matrix", help="source local: the genes x samples matrix the manifest's "
                   "rows name columns of (instead of STAR files)")

    p = command("sequences", _sequences, "AnnData to ordered gene token sequences")
    p.add_argument("--expression", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--sequences", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--gtf", help="GENCODE GTF with the gene positions (order genomic)")
    p.add_argument("--encoding", help="write the fitted encoding here (encoding.npz)")
    p.add_argument("--from-encoding", help="encode with this fitted encoding (another cohort's "
                   "encoding.npz) instead of fitting one on the train split")

    p = command("image", _image, "one MR series or slide to its image bank")
    p.add_argument("--images", required=True, help="the image table (images.tsv)")
    p.add_argument("--image-id", required=True)
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--qc", required=True)
    p.add_argument("--thumbnail")
    p.add_argument("--stain-reference", help="fitted stain normaliser (JSON) for slides")
    p.add_argument("--threads", type=int, default=1, help="slide reads at once")

    p = command("stain-reference", _stain_reference, "fit the cohort's stain normaliser")
    p.add_argument("--images", required=True, help="the image table (images.tsv)")
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--out", required=True)

    p = command("qc-merge", _qc_merge, "merge per-image QC rows into one table")
    p.add_argument("rows", nargs="+")
    p.add_argument("--out", required=True)

    p = command("splits", _splits, "patient-level train/val/test splits")
    p.add_argument("--expression", required=True)
    p.add_argument("--qc", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--given", help="splits fixed by the sample sheet (case_id, split); used "
                   "instead of drawing them when it has rows")

    p = command("folds", _folds, "k-fold cross-validation: each fold's splits table")
    p.add_argument("--expression", required=True)
    p.add_argument("--qc", required=True)
    p.add_argument("--clinical", help="clinical.tsv, holding splits.stratify's column")
    p.add_argument("--fixed-splits", required=True, help="splits.tsv (the one fold of folds 1)")
    p.add_argument("--settings", required=True)
    p.add_argument("--given", help="the sample sheet's splits (refused with folds > 1)")
    p.add_argument("--folds", required=True, help="out: case_id, fold, stratum")
    p.add_argument("--out", nargs="+", required=True, help="out: fold 0, 1, ... splits tables")

    for name, func, help in [
        ("pretrain", _pretrain, "contrastive pre-training"),
        ("finetune", _finetune, "segmentation fine-tuning of one variant"),
    ]:
        p = command(name, func, help)
        if name == "finetune":
            p.add_argument("--variant", required=True)
            p.add_argument("--pretrained")
        else:
            p.add_argument("--devices", type=int, help="processes per node (pretrain.devices)")
            p.add_argument("--num-nodes", type=int, help="nodes (pretrain.num_nodes)")
        p.add_argument("--sequences", required=True)
        p.add_argument("--splits", required=True)
        p.add_argument("--qc", required=True)
        p.add_argument("--settings", required=True)
        p.add_argument("--out-dir", required=True)
        p.add_argument("--threads", type=int, default=1)

    p = command("evaluate", _evaluate, "segmentation metrics of one variant on the test split")
    p.add_argument("--model", required=True)
    p.add_argument("--sequences", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--qc", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--patients", required=True)
    p.add_argument("--slices", required=True)
    p.add_argument("--predictions", required=True, help="probabilities of every test item (HDF5)")
    p.add_argument("--predictions-dir",
                   help="masks per test patient (NIfTI / PNG) [predictions/ beside --patients]")
    p.add_argument("--status", help="status.json of the variant [beside --patients]")
    p.add_argument("--threads", type=int, default=1)

    p = command("export", _export, "a fine-tuned variant and what applies it, as one bundle")
    p.add_argument("--variant", required=True)
    p.add_argument("--results", required=True, help="the cohort's results folder")
    p.add_argument("--out", required=True, help="the bundle file (.mgi, a zip)")
    p.add_argument("--threshold", type=float,
                   help="evaluate.threshold: the probability a mask is cut at [schema default]")
    p.add_argument("--pretrain", help="the pre-training checkpoint the variant was fine-tuned "
                   "from [pretrain/model.pt, or the ablation's, of --results]")

    p = command("unbundle", _unbundle, "a bundle's pre-training and encoding, to fine-tune from")
    p.add_argument("--bundle", required=True, help="the model bundle (mgi export)")
    p.add_argument("--pretrain", required=True, help="where its pretrain.pt goes")
    p.add_argument("--encoding", required=True, help="where its encoding.npz goes")

    p = command("predict", _predict, "a bundled model applied to new patients of a sample sheet")
    p.add_argument("--bundle", required=True, help="the model bundle (mgi export)")
    p.add_argument("--samples", required=True, help="sample sheet: case_id, expression, image")
    p.add_argument("--out", required=True, help="folder for masks, volumes.tsv, overlays, qc")
    p.add_argument("--threads", type=int, default=1)

    p = command("report", _report, "metrics.json and the self-contained report.html")
    p.add_argument("--cohort", required=True)
    p.add_argument("--settings", required=True)
    p.add_argument("--retrieval", required=True, help="pretrain/retrieval.json")
    p.add_argument("--pretrain-history", required=True, help="pretrain/history.tsv")
    p.add_argument("--splits", required=True)
    p.add_argument("--qc", required=True, help="images/qc.tsv")
    p.add_argument("--banks", nargs="*", default=[], help="image banks ({image_id}.h5)")
    p.add_argument("--variants", nargs="+", required=True, help="the variants, in this order:")
    p.add_argument("--patients", nargs="+", required=True, help="test_patients.tsv of each")
    p.add_argument("--slices", nargs="+", required=True, help="test_slices.tsv of each")
    p.add_argument("--predictions", nargs="+", required=True, help="test_predictions.h5 of each")
    p.add_argument("--status", nargs="+", required=True, help="status.json of each")
    p.add_argument("--histories", nargs="+", required=True, help="history.tsv of each")
    p.add_argument("--attribution", help="gene attribution table (mgi attribute --out)")
    p.add_argument("--attribution-summary", help="its summary (mgi attribute --summary)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--html", required=True)
    p.add_argument("--figures", help="folder for the report's figures as PNG files")
    p.add_argument("--test-patients", help="out: every variant's test patients in one table")
    p.add_argument("--runs", nargs="*", default=[],
                   help="folds and seeds: every run as variant:fold:seed, in this order:")
    p.add_argument("--run-patients", nargs="*", default=[], help="test_patients.tsv of each run")
    p.add_argument("--run-status", nargs="*", default=[], help="status.json of each run")
    p.add_argument("--run-histories", nargs="*", default=[], help="history.tsv of each run")
    p.add_argument("--pretrainings", nargs="*", default=[],
                   help="folds and seeds: every pre-training as fold:seed, in this order:")
    p.add_argument("--fold-retrievals", nargs="*", default=[], help="retrieval.json of each")

    p = command("runs", _runs, "folds and seeds: every run and its status, one table")
    p.add_argument("--runs", nargs="*", default=[], help="every run as variant:fold:seed")
    p.add_argument("--status", nargs="*", default=[], help="status.json of each run")
    p.add_argument("--out", required=True, help="out: variant, fold, seed, status, error, folder")

    p = command("attribute", _attribute,
                "which genes the pre-trained image-gene similarity leans on (Integrated Gradients)")
    p.add_argument("--model", required=True, help="pre-training checkpoint (pretrain/model.pt)")
    p.add_argument("--sequences", required=True)
    p.add_argument("--vocab", required=True)
    p.add_argument("--splits", required=True)
    p.add_argument("--qc", required=True)
    p.add_argument("--planted", help="synthetic cohorts: the planted genes (synthetic_genes.tsv)")
    p.add_argument("--split", nargs="+", default=["val", "test"],
                   choices=["train", "val", "test"], help="patients attributed (held-out)")
    p.add_argument("--steps", type=int, default=64, help="integration steps")
    p.add_argument("--out", required=True, help="per-gene table (TSV)")
    p.add_argument("--summary", required=True, help="method, patients, completeness (JSON)")
    p.add_argument("--threads", type=int, default=1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mgi` command; stage errors are printed without a traceback."""
    from mgi.train.launch import slurm_job

    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if job := slurm_job(os.environ):
        log.info("running in %s", job)
    try:
        args.func(args)
    except MgiError as err:
        print(f"mgi {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
