"""`mgi acquire {gdc-query, gdc-download, images, gtf, local}`: a real cohort's raw tables.

gdc-query    manifest.tsv (one expression profile per case, and slides for imaging.modality
             wsi) and clinical.tsv.
gdc-download every manifest file under the raw folder; expression/ and slides/ always exist
             after it. Failure policy: the manifest is never rewritten (it is this rule's input);
             files that could not be fetched are listed in `download_failures.tsv` beside it
             (always written, empty when all went well) and logged, and later stages report the
             missing files. The command fails (non-zero exit) only when no expression file of
             the manifest is in place at the end, since nothing downstream can run then.
images       images.tsv: for wsi one row per slide of the manifest that is on disk; for mri the
             cases' MR series from TCIA (one row per case with radiology) and their masks.
             Series that failed are listed in `image_failures.tsv` beside images.tsv.
gtf          the GENCODE GTF among the GDC reference files (gene positions for the genomic
             gene order), md5-checked like every other download.
local        source local: manifest.tsv, clinical.tsv, images.tsv and given_splits.tsv of the
             sample sheet sources.local.samples, files read in place (`mgi.acquire.local`);
             expression_failures.tsv and image_failures.tsv list the patients left out.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pandas as pd

from mgi.acquire import gdc, radiology
from mgi.acquire.http import new_session, safe_relative
from mgi.errors import AcquireError, MgiError
from mgi.io import read_tsv, write_tsv
from mgi.layout import IMAGE_TABLE_COLUMNS
from mgi.options import AcquireSettings, GdcOptions, SourcesSettings, stage_settings

log = logging.getLogger(__name__)

ACTIONS = ("gdc-query", "gdc-download", "images", "gtf", "local")


def run(action: str, args: argparse.Namespace) -> None:
    """Run one acquire action with the CLI's arguments (settings as a JSON string)."""
    handlers = {"gdc-query": gdc_query, "gdc-download": gdc_download, "images": image_table,
                "gtf": gene_annotation, "local": local_cohort}
    if action not in handlers:
        raise AcquireError(f"unknown acquire action {action!r}; expected one of {ACTIONS}")
    kind = SourcesSettings if action in ("gdc-download", "gtf") else AcquireSettings
    handlers[action](stage_settings(kind, args.settings), args)


def _arg(args: argparse.Namespace, name: str, action: str) -> Path:
    value = getattr(args, name, None)
    if not value:
        raise AcquireError(f"mgi acquire {action}: --{name.replace('_', '-')} is required")
    return Path(value)


def _token(gdc_settings: GdcOptions) -> str | None:
    name = gdc_settings.token_env
    token = os.environ.get(name) if name else None
    if token:
        log.info("GDC token: taken from environment variable %s", name)
    return token or None


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        return read_tsv(path, required=gdc.MANIFEST_COLUMNS[:9])
    except MgiError as err:
        raise AcquireError(str(err)) from err


def gdc_query(settings: AcquireSettings, args: argparse.Namespace) -> None:
    """Write manifest.tsv and clinical.tsv of the cohort's open GDC files."""
    source = settings.sources.gdc
    modality = settings.imaging.modality
    manifest_path = _arg(args, "manifest", "gdc-query")
    clinical_path = _arg(args, "clinical", "gdc-query")
    api_url = source.api_url
    projects = list(source.project_ids)
    with new_session(token=_token(source)) as session:
        hits = gdc.query_files(session, api_url, filters=gdc.expression_filters(
            project_ids=projects, workflow_type=source.workflow_type))
        manifest = gdc.choose_primary_profiles(gdc.build_manifest(hits))
        manifest = gdc.limit_cases(manifest, source.max_cases)
        if manifest.empty:
            raise AcquireError(f"GDC {api_url}: no open {gdc.EXPRESSION_DATA_TYPE!r} files of "
                               f"workflow {source.workflow_type!r} in projects {projects}")
        case_ids = sorted(set(manifest["case_id"]))
        if modality == "wsi":
            slide_hits = gdc.query_files(session, api_url, filters=gdc.slide_filters(
                project_ids=projects, strategies=list(source.slide_strategies)))
            slides = gdc.build_manifest(slide_hits)
            slides = slides[slides["case_id"].isin(case_ids)]
            log.info("%d slide(s) of %d case(s)", len(slides), slides["case_id"].nunique())
            manifest = pd.concat([manifest, slides], ignore_index=True)
        cases = gdc.query_cases(session, api_url,
                                filters=gdc.case_filters(project_ids=projects, case_ids=case_ids))
    clinical = gdc.clinical_table(cases, case_ids=case_ids)
    write_tsv(manifest.reindex(columns=gdc.MANIFEST_COLUMNS), manifest_path)
    write_tsv(clinical, clinical_path)
    log.info("manifest: %d file(s) of %d case(s) -> %s; clinical -> %s", len(manifest),
             len(case_ids), manifest_path, clinical_path)


def gdc_download(settings: SourcesSettings, args: argparse.Namespace) -> None:
    """Download the manifest's files; write download_failures.tsv beside the manifest."""
    source = settings.sources.gdc
    manifest_path = _arg(args, "manifest", "gdc-download")
    raw_dir = _arg(args, "raw_dir", "gdc-download")
    manifest = _read_manifest(manifest_path)
    for folder in ("expression", "slides"):
        (raw_dir / folder).mkdir(parents=True, exist_ok=True)
    summary = gdc.download_files(
        manifest, raw_dir, api_url=source.api_url, parallel=source.parallel,
        token=_token(source))
    failures_path = manifest_path.with_name("download_failures.tsv")
    write_tsv(gdc.failures_table(manifest, summary), failures_path)
    expression = manifest[manifest["data_type"] == gdc.EXPRESSION_DATA_TYPE]
    present = [p for p in expression["path"] if (raw_dir / p).is_file()]
    if summary.failed:
        log.warning("%d file(s) could not be downloaded, listed in %s; later stages will miss "
                    "them", len(summary.failed), failures_path)
    if not present:
        raise AcquireError(f"{manifest_path}: none of its {len(expression)} expression file(s) "
                           f"could be downloaded to {raw_dir}; see {failures_path}")


def gene_annotation(settings: SourcesSettings, args: argparse.Namespace) -> None:
    """Download the GTF named by sources.gdc.gtf (a GDC reference file) to --out."""
    source = settings.sources.gdc
    reference = source.gtf
    out = _arg(args, "out", "gtf")
    row = {"id": reference.file_id, "md5": reference.md5, "size": reference.size,
           "path": out.name}
    summary = gdc.download_files(
        pd.DataFrame([row]), out.parent, api_url=source.api_url, parallel=1,
        token=_token(source))
    if summary.failed:
        raise AcquireError(f"GDC reference file {row['id']} (GTF for the genomic gene order) "
                           f"could not be downloaded to {out}: {summary.failed[0][1]}")
    log.info("GTF %s -> %s (%s)", row["id"], out, summary.line())


def image_table(settings: AcquireSettings, args: argparse.Namespace) -> None:
    """Write images.tsv: the slides on disk (wsi) or the cases' MR series from TCIA (mri)."""
    modality = settings.imaging.modality
    manifest_path = _arg(args, "manifest", "images")
    raw_dir = _arg(args, "raw_dir", "images")
    images_path = _arg(args, "images", "images")
    manifest = _read_manifest(manifest_path)
    for folder in ("radiology", "masks", "slides"):
        (raw_dir / folder).mkdir(parents=True, exist_ok=True)
    if modality == "wsi":
        table = _slide_rows(manifest, raw_dir)
    elif modality == "mri":
        tcia_settings = settings.sources.tcia
        cases = sorted(set(manifest.loc[manifest["data_type"] == gdc.EXPRESSION_DATA_TYPE,
                                        "case_id"]))
        table, failures, audit = radiology.acquire_mri(
            raw_dir, case_ids=cases, tcia_options=tcia_settings, mri=settings.imaging.mri,
            # sources.tcia has no `parallel`; the GDC's "files downloaded at once" serves both
            parallel=settings.sources.gdc.parallel)
        write_tsv(failures, images_path.with_name("image_failures.tsv"))
        write_tsv(audit, images_path.with_name("series_choice.tsv"))
        log.info("series choice per case and role: %s", images_path.with_name("series_choice.tsv"))
    else:
        raise AcquireError(f"imaging.modality: {modality!r}, expected 'mri' or 'wsi'")
    if table.empty:
        raise AcquireError(f"{images_path}: no {modality} image could be found for the "
                           f"{manifest['case_id'].nunique()} case(s) of {manifest_path}")
    write_tsv(table, images_path)
    log.info("image table: %d %s image(s) of %d case(s) -> %s", len(table), modality,
             table["case_id"].nunique(), images_path)


def local_cohort(settings: AcquireSettings, args: argparse.Namespace) -> None:
    """Write the raw tables of the sample sheet's cohort (source local) and its failures."""
    from mgi.acquire import local

    source = settings.sources.local
    if not source.samples:
        raise AcquireError("sources.local.samples: not set; source local needs a sample sheet "
                           "(TSV, one row per patient; see cohorts/local-example.yaml)")
    manifest_path = _arg(args, "manifest", "local")
    clinical_path = _arg(args, "clinical", "local")
    images_path = _arg(args, "images", "local")
    raw_dir = _arg(args, "raw_dir", "local")
    cohort = local.local_cohort(
        source.samples, matrix=source.matrix, modality=settings.imaging.modality,
        raw_dir=raw_dir, mri=settings.imaging.mri, nifti_labels=settings.sources.tcia.nifti_labels)
    write_tsv(cohort.expression_failures, raw_dir / "expression_failures.tsv")
    write_tsv(cohort.image_failures, images_path.with_name("image_failures.tsv"))
    if not cohort.choices.empty:
        write_tsv(cohort.choices, images_path.with_name("series_choice.tsv"))
    write_tsv(cohort.splits, raw_dir / "given_splits.tsv")
    write_tsv(cohort.manifest, manifest_path)
    write_tsv(cohort.clinical, clinical_path)
    write_tsv(cohort.images, images_path)
    log.info("local cohort %s: %d patient(s) -> %s, %s, %s", source.samples,
             len(cohort.manifest), manifest_path, clinical_path, images_path)


def _slide_rows(manifest: pd.DataFrame, raw_dir: Path) -> pd.DataFrame:
    slides = manifest[manifest["data_type"] == gdc.SLIDE_DATA_TYPE]
    on_disk = slides["path"].map(
        lambda p: safe_relative(raw_dir, p, what="manifest slide").is_file())
    if (~on_disk).any():
        log.warning("%d slide(s) of the manifest are not on disk and are left out: %s",
                    int((~on_disk).sum()), slides.loc[~on_disk, "id"].tolist()[:10])
    slides = slides[on_disk]
    return pd.DataFrame({
        "image_id": slides["id"], "case_id": slides["case_id"], "modality": "wsi",
        "path": slides["path"], "mask_path": "",
    }, columns=IMAGE_TABLE_COLUMNS).reset_index(drop=True)
