"""Which series of a case feeds each configured sequence role (channel), by DICOM tags.

A case folder (TCIA style `patient/study/series/*.dcm`, or one folder per series) is scanned
once: each folder that holds files gives one `SeriesHeader`, read from ONE of its files
(`scan_case`). `choose_series` then picks a study, and per role (imaging.mri.roles) the best
series of that study by the role's rule: description patterns, excludes, contrast,
InversionTime window, planes in order of preference. Every series gets a row in the choice
table saying whether it was chosen, a lower-ranked candidate, rejected (and by which rule) or in
another study.

Contrast is read in this order, and the order matters:

1. the description's words: pre-words (PRE, PRECONTRAST, W/O, WO, WITHOUT, NON CONTRAST) say
   "pre", else post-words (POST, POSTCONTRAST, +C, C+, GAD, GADO, GD, CONTRAST, CE, W/, WITH)
   say "post"; pre-words go first because "T1 PRE GAD", "NON CONTRAST" and "W/O" hold a
   post-word too;
2. else a non-empty ContrastBolusAgent says "post";
3. else "pre".

Words come before the tag because some sites fill ContrastBolusAgent on every series of a
study once an agent is planned, the pre-contrast T1 included, while "AX T1 +C" is what the
technologist meant. For the same reason `choose_series` ignores the tag in a study where every
series carries it (a localizer scanned before the injection would not): there a series whose
words are silent counts as pre-contrast.

Before any download, `listing_candidates` applies the description rules to a provider's series
listing, so that only series that may serve a role are fetched. The acquire stage may write
`series.tsv` into the case folder (`write_series_table` writes the same table): where it exists,
its rows decide (`choose_case_series`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from mgi.errors import ConfigError, MgiError, SeriesError
from mgi.imaging.mri.dicom import functional_group, read_dicom, series_files
from mgi.io import read_tsv, write_tsv
from mgi.options import MriOptions, RoleRule

log = logging.getLogger(__name__)

SERIES_TABLE = "series.tsv"  # written by the acquire stage (or write_series_table)
SKIPPED_FILES = {SERIES_TABLE.casefold(), "dicomdir"}
PLANES = ("sagittal", "coronal", "axial")  # by the dominant axis of the slice normal (x, y, z)
READ_TRIES = 5  # files tried for a header before a folder counts as holding no DICOM

CHOICE_COLUMNS = [
    "case_id", "StudyInstanceUID", "StudyDate", "SeriesInstanceUID", "SeriesNumber",
    "SeriesDescription", "plane", "contrast", "inversion_time_ms", "image_type", "n_slices",
    "sequence", "status", "reason", "path",
]
# write_series_table / series.tsv: the chosen series, one row per role
CHOSEN_SERIES_COLUMNS = ["SeriesInstanceUID", "sequence", "SeriesDescription", "ImageCount",
                         "path", "reason"]
OVERRIDE_COLUMNS = ["case_id", "sequence", "SeriesInstanceUID"]
RANK_KEYS = ("plane", "slices", "SeriesNumber", "SeriesInstanceUID")

# Letters must not touch a word on either side ("T1PRE", "T1+C" and "T1GD" count; "PRESAT",
# "SPACE" and "WITHOUT" as a post-word do not). "PRE OP" / "POST OP" speak of surgery.
_PRE_WORDS = re.compile(
    r"(?<![a-z])(?:pre ?contrast|pre(?! ?op)|w/o|wo|without|non ?contrast)(?![a-z])")
_POST_WORDS = re.compile(
    r"(?<![a-z])(?:post(?: ?(?:contrast|gad|gado|gd))?(?! ?op)|gad|gado|gadolinium|gd"
    r"|contrast|ce|with)(?![a-z])"
    r"|\+ ?c(?![a-z])|(?<![a-z])c ?\+|(?<![a-z])w/")


def normalise_text(text: str) -> str:
    """Case-folded description with '_' and '-' read as spaces and runs of spaces as one."""
    return " ".join(str(text).casefold().replace("_", " ").replace("-", " ").split())


def contrast_of(description: str, agent: str = "") -> tuple[str, str]:
    """("pre" | "post", how it was decided: "words" | "ContrastBolusAgent" | "default")."""
    text = normalise_text(description)
    if _PRE_WORDS.search(text):
        return "pre", "words"
    if _POST_WORDS.search(text):
        return "post", "words"
    if str(agent).strip():
        return "post", "ContrastBolusAgent"
    return "pre", "default"


@dataclass(frozen=True)
class SeriesHeader:
    """What the choice needs of one series folder, from one of its files."""

    folder: Path
    uid: str = ""  # SeriesInstanceUID
    study_uid: str = ""
    study_date: str = ""  # YYYYMMDD as recorded; "" when absent
    series_number: int | None = None
    description: str = ""  # SeriesDescription, else ProtocolName
    modality: str = ""
    image_type: tuple[str, ...] = ()
    plane: str | None = None  # axial | coronal | sagittal; None without ImageOrientationPatient
    contrast_agent: str = ""  # ContrastBolusAgent
    inversion_time_ms: float | None = None
    n_slices: int = 0  # files (times NumberOfFrames for Enhanced MR)
    mr_acquisition_type: str = ""  # 2D | 3D
    frame_of_reference: str = ""
    error: str = ""  # why the folder cannot serve ("" = readable)
    contrast: str = field(init=False)  # pre | post, see the module docstring
    contrast_by: str = field(init=False)  # words | ContrastBolusAgent | default

    def __post_init__(self) -> None:
        contrast, by = contrast_of(self.description, self.contrast_agent)
        object.__setattr__(self, "contrast", contrast)
        object.__setattr__(self, "contrast_by", by)


# --- reading --------------------------------------------------------------------------------


def plane_of(orientation: Iterable[float]) -> str:
    """axial | coronal | sagittal: the dominant component of the slice normal."""
    iop = np.asarray(list(orientation), dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return PLANES[int(np.argmax(np.abs(normal)))]


def _files(folder: Path) -> list[Path]:
    return [p for p in series_files(folder)
            if not p.name.startswith(".") and p.name.casefold() not in SKIPPED_FILES]


def _text_of(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if _text_of(value) else None
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    if value is None or _text_of(value) == "":
        return None
    try:
        first = value[0] if isinstance(value, (list, tuple, MultiValue)) else value
        number = float(first)
    except (TypeError, ValueError, IndexError):
        return None
    return number if np.isfinite(number) else None


def _enhanced_groups(ds: pydicom.Dataset) -> tuple[Any, ...]:
    """Where Enhanced MR keeps per-frame attributes: the first frame's groups, then shared."""
    sources = []
    for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if keyword in ds and len(ds[keyword].value):
            sources.append(ds[keyword].value[0])
    return tuple(sources)


def _group_value(path: Path, groups: tuple[Any, ...], sequence: str, keyword: str) -> Any:
    """`keyword` in functional group `sequence` (first frame, then shared); None when absent."""
    try:
        item = functional_group(path, sequence, groups, "")
    except SeriesError:
        return None
    return item.get(keyword)


def _agent(ds: pydicom.Dataset) -> str:
    """ContrastBolusAgent, else (Enhanced MR) the first agent's code meaning."""
    agent = _text_of(ds.get("ContrastBolusAgent"))
    if agent or "ContrastBolusAgentSequence" not in ds:
        return agent
    items = ds.ContrastBolusAgentSequence
    return _text_of(items[0].get("CodeMeaning", "agent")) if len(items) else ""


def read_series_header(folder: Path) -> SeriesHeader:
    """The header of the series in `folder`, read from one file; `error` says why not usable."""
    folder = Path(folder)
    try:
        files = _files(folder)
        if not files:
            raise SeriesError(f"{folder}: series folder holds no DICOM file")
    except SeriesError as err:
        return SeriesHeader(folder=folder, error=str(err))
    first_error, ds, path = "", None, files[0]
    for path in files[:READ_TRIES]:  # a stray non-DICOM file (a note, a thumbnail) may sort first
        try:
            ds = read_dicom(path, stop_before_pixels=True)
            break
        except SeriesError as err:
            first_error = first_error or str(err)
    if ds is None:
        tried = (f"its first {min(len(files), READ_TRIES)} files" if len(files) > 1
                 else "its only file")
        return SeriesHeader(folder=folder, error=f"{folder}: no DICOM file among {tried} "
                                                 f"({first_error})")
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    groups = _enhanced_groups(ds) if enhanced else ()
    orientation = ds.get("ImageOrientationPatient")
    if orientation is None and enhanced:
        orientation = _group_value(path, groups, "PlaneOrientationSequence",
                                   "ImageOrientationPatient")
    try:
        plane = plane_of(orientation) if orientation is not None else None
    except (TypeError, ValueError):
        plane = None
    inversion = _float_or_none(ds.get("InversionTime"))
    if inversion is None and enhanced:
        inversion = _float_or_none(_group_value(path, groups, "MRModifierSequence",
                                                "InversionTimes"))
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    image_type = ds.get("ImageType")
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return SeriesHeader(
        folder=folder,
        uid=_text_of(ds.get("SeriesInstanceUID")),
        study_uid=_text_of(ds.get("StudyInstanceUID")),
        study_date=_text_of(ds.get("StudyDate")),
        series_number=_int_or_none(ds.get("SeriesNumber")),
        description=_text_of(ds.get("SeriesDescription")) or _text_of(ds.get("ProtocolName")),
        modality=_text_of(ds.get("Modality")),
        image_type=tuple(_text_of(t).upper() for t in (image_type or ())),
        plane=plane,
        contrast_agent=_agent(ds),
        inversion_time_ms=inversion,
        n_slices=len(files) * frames,
        mr_acquisition_type=_text_of(ds.get("MRAcquisitionType")),
        frame_of_reference=_text_of(ds.get("FrameOfReferenceUID")),
    )


def _series_uids(files: list[Path]) -> set[str]:
    """The SeriesInstanceUIDs of the DICOM files among `files` (others are skipped)."""
    uids = set()
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            continue
        uids.add(_text_of(ds.get("SeriesInstanceUID")))
    return uids


def scan_case(case_folder: Path) -> list[SeriesHeader]:
    """A header for every folder under `case_folder` (any depth) that holds files, by path.

    Hidden files and folders, DICOMDIR and series.tsv are skipped. A folder holding files of
    several SeriesInstanceUIDs is listed with an error (one series per folder is expected).
    """
    root = Path(case_folder)
    if not root.is_dir():
        raise SeriesError(f"{root}: case folder not found")
    headers = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = [n for n in filenames
                 if not n.startswith(".") and n.casefold() not in SKIPPED_FILES]
        if not names:
            continue
        folder = Path(dirpath)
        header = read_series_header(folder)
        if not header.error:
            uids = _series_uids(_files(folder))
            if len(uids) > 1:
                header = SeriesHeader(
                    **{**_fields(header), "error": f"{folder}: files of {len(uids)} series "
                       f"(SeriesInstanceUID {sorted(uids)}), expected one series per folder"})
        headers.append(header)
    return sorted(headers, key=lambda h: str(h.folder))


def _fields(header: SeriesHeader) -> dict[str, Any]:
    return {k: getattr(header, k) for k in header.__dataclass_fields__
            if header.__dataclass_fields__[k].init}


# --- rules ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str, role: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ConfigError(f"imaging.mri.roles.{role}: invalid regular expression {pattern!r} "
                          f"({err})") from err


def _description_matches(text: str, rule: RoleRule, role: str) -> bool:
    return any(_pattern(p, role).search(text) for p in rule.description)


def _excluded_by(text: str, rule: RoleRule, role: str) -> str | None:
    return next((p for p in rule.exclude if _pattern(p, role).search(text)), None)


def role_order(options: MriOptions) -> list[str]:
    """The roles in the order they are filled: the reference first, then the sequences."""
    return [options.reference, *(s for s in options.sequences if s != options.reference)]


def _common_rejection(header: SeriesHeader, options: MriOptions) -> str | None:
    """Why no role can use this series (whatever the role), or None."""
    if header.error:
        return f"unreadable: {header.error}"
    if header.modality != "MR":
        return f"Modality {header.modality or 'missing'}, not MR"
    if "LOCALIZER" in header.image_type:
        return "localizer (ImageType LOCALIZER)"
    derived = [t for t in ("DERIVED", "SECONDARY") if t in header.image_type]
    if derived and not options.allow_derived:
        return f"ImageType {'/'.join(derived)} (allow_derived is false)"
    if header.n_slices < options.min_slices:
        return f"{header.n_slices} slices < min_slices {options.min_slices}"
    if header.plane is None:
        return "no ImageOrientationPatient (plane unknown)"
    return None


@dataclass(frozen=True)
class _Look:
    """A header as the rules see it in its study (the contrast may be corrected there)."""

    header: SeriesHeader
    contrast: str
    contrast_by: str


def _role_rejection(look: _Look, rule: RoleRule, role: str) -> str | None:
    """The first rule of `role` that rules this series out, or None."""
    header = look.header
    text = normalise_text(header.description)
    if not _description_matches(text, rule, role):
        return "description matches no pattern"
    pattern = _excluded_by(text, rule, role)
    if pattern is not None:
        return f"exclude {pattern!r} matches"
    if rule.contrast != "any" and look.contrast != rule.contrast:
        return f"{look.contrast}-contrast (by {look.contrast_by}), wants {rule.contrast}"
    window = rule.inversion_time_ms
    if window is not None and header.inversion_time_ms is not None:
        low, high = window
        if not low <= header.inversion_time_ms <= high:
            return (f"InversionTime {header.inversion_time_ms:g} ms outside "
                    f"[{low:g}, {high:g}]")
    if header.plane not in rule.planes:
        return f"{header.plane} plane not in {list(rule.planes)}"
    return None


def _looks(headers: list[SeriesHeader]) -> list[_Look]:
    """Each header with its contrast, ignoring ContrastBolusAgent in studies that tag all."""
    by_study: dict[str, list[SeriesHeader]] = {}
    for header in headers:
        if not header.error and header.modality == "MR":
            by_study.setdefault(header.study_uid, []).append(header)
    tag_all = {uid for uid, group in by_study.items()
               if len(group) > 1 and all(h.contrast_agent for h in group)}
    looks = []
    for header in headers:
        if header.contrast_by == "ContrastBolusAgent" and header.study_uid in tag_all \
                and not header.error:
            looks.append(_Look(header, "pre", "default (ContrastBolusAgent on every series)"))
        else:
            looks.append(_Look(header, header.contrast, header.contrast_by))
    return looks


def _rank_key(header: SeriesHeader, rule: RoleRule) -> tuple[Any, ...]:
    number = header.series_number if header.series_number is not None else 2**31
    return (rule.planes.index(header.plane), -header.n_slices, number, header.uid)


def _describe(look: _Look, rule: RoleRule | None = None) -> str:
    """'AX T2 FLAIR' (axial, TI 2500 ms, 24 slices)."""
    header = look.header
    parts = [header.plane or "plane unknown"]
    if rule is None or rule.contrast != "any":
        parts.append(f"{look.contrast}-contrast by {look.contrast_by}")
    if header.inversion_time_ms is not None:
        parts.append(f"TI {header.inversion_time_ms:g} ms")
    parts.append(f"{header.n_slices} slices")
    return f"{header.description!r} ({', '.join(parts)})"


# --- choosing -------------------------------------------------------------------------------


@dataclass
class SeriesChoice:
    """The series chosen for each role of one case, and why."""

    folders: dict[str, Path]  # role -> series folder
    reasons: dict[str, str]  # role -> why that series (or why none)
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # CHOICE_COLUMNS, every series
    uids: dict[str, str] = field(default_factory=dict)  # role -> SeriesInstanceUID
    study_uid: str = ""  # the study the series come from
    study_reason: str = ""  # why that study

    def summary(self) -> str:
        """One line: each role's outcome."""
        return "; ".join(f"{role}: {why}" for role, why in self.reasons.items())


@dataclass
class _Study:
    uid: str
    date: str
    looks: list[_Look]
    candidates: dict[str, list[_Look]]  # role -> series passing its rule, best first
    rejections: dict[Path, dict[str, str]]  # folder -> role -> the first rule that failed

    @property
    def label(self) -> str:
        return f"study {self.date or 'undated'} ({self.uid or 'no StudyInstanceUID'})"

    def passes(self, look: _Look, role: str) -> bool:
        return any(c.header.folder == look.header.folder for c in self.candidates[role])


def _studies(looks: list[_Look], roles: list[str], options: MriOptions) -> list[_Study]:
    """Readable series grouped by study, earliest StudyDate first (undated last)."""
    groups: dict[str, list[_Look]] = {}
    for look in looks:
        if not look.header.error:
            groups.setdefault(look.header.study_uid, []).append(look)
    studies = []
    for uid, group in groups.items():
        candidates: dict[str, list[_Look]] = {role: [] for role in roles}
        rejections: dict[Path, dict[str, str]] = {}
        for look in group:
            common = _common_rejection(look.header, options)
            for role in roles:
                why = common or _role_rejection(look, options.roles[role], role)
                if why is None:
                    candidates[role].append(look)
                else:
                    rejections.setdefault(look.header.folder, {})[role] = why
        for role in roles:
            candidates[role].sort(key=lambda lk, r=role: _rank_key(lk.header, options.roles[r]))
        dates = sorted({lk.header.study_date for lk in group if lk.header.study_date})
        studies.append(_Study(uid, dates[0] if dates else "", group, candidates, rejections))
    return sorted(studies, key=lambda s: (s.date == "", s.date, s.uid))


def _assign(study: _Study, roles: list[str], pinned: dict[str, _Look]) -> dict[str, _Look]:
    """Each role's best candidate that serves no other role yet (pinned series first)."""
    taken = {look.header.folder for look in pinned.values()}
    chosen = dict(pinned)
    for role in roles:
        if role in chosen:
            continue
        best = next((lk for lk in study.candidates[role] if lk.header.folder not in taken), None)
        if best is not None:
            chosen[role] = best
            taken.add(best.header.folder)
    return chosen


def _choose_study(studies: list[_Study], roles: list[str], options: MriOptions,
                  pinned: tuple[str, str] | None) -> tuple[_Study | None, str]:
    """The study the series come from, and why (`pinned`: an override's study and role)."""
    if not studies:
        return None, "no readable series"
    of = f"of {len(studies)} {'study' if len(studies) == 1 else 'studies'}"
    if pinned is not None:
        uid, role = pinned
        study = next(s for s in studies if s.uid == uid)
        return study, f"{study.label}: holds the override for {role} ({of})"
    if options.study == "most_complete":
        filled = [len(_assign(s, roles, {})) for s in studies]
        best = int(np.argmax(filled))  # the first maximum: the earliest of those tied
        return studies[best], (f"{studies[best].label}: fills {filled[best]} of {len(roles)} "
                               f"roles, the most ({of}; ties go to the earliest)")
    reference = options.reference
    for study in studies:
        if study.candidates[reference]:
            return study, f"{study.label}: the earliest with a {reference} candidate ({of})"
    for study in studies:
        if any(study.candidates[role] for role in roles):
            return study, (f"{study.label}: no study has a {reference} candidate; the earliest "
                           f"with any candidate ({of})")
    return studies[0], f"{studies[0].label}: no study has a candidate ({of})"


def _ranked_reason(look: _Look, role: str, study: _Study, rule: RoleRule,
                   others: dict[Path, str]) -> str:
    """Why this candidate: how many competed and which rank key put it first."""
    free = [lk for lk in study.candidates[role] if lk.header.folder not in others]
    busy = sorted({others[lk.header.folder] for lk in study.candidates[role]
                   if lk.header.folder in others})
    text = _describe(look, rule)
    if len(free) == 1:
        text += "; the only candidate"
    else:
        first, second = _rank_key(free[0].header, rule), _rank_key(free[1].header, rule)
        by = next((name for name, a, b in zip(RANK_KEYS, first, second, strict=True) if a != b),
                  "folder")
        text += f"; {len(free)} candidates, ranked first by {by}"
    if busy:
        text += f" (other candidates serve {', '.join(busy)})"
    return text


def _empty_reason(role: str, study: _Study | None, options: MriOptions,
                  taken: dict[Path, str], limit: int = 3) -> str:
    """Why no series serves `role`: the near misses (description matched) and their rule."""
    if study is None:
        return "no series: no readable series in the case folder"
    rule = options.roles[role]
    near = []
    for look in study.looks:
        header = look.header
        if header.folder in taken and study.passes(look, role):
            near.append(f"{header.description!r} serves {taken[header.folder]}")
        elif _description_matches(normalise_text(header.description), rule, role):
            why = study.rejections.get(header.folder, {}).get(role)
            if why is not None:
                near.append(f"{header.description!r} rejected: {why}")
    if not near:
        return (f"no series: no description of the {len(study.looks)} series of {study.label} "
                f"matches {list(rule.description)}")
    more = f"; and {len(near) - limit} more" if len(near) > limit else ""
    return "no series: " + "; ".join(near[:limit]) + more


def _compact(rejections: dict[str, str]) -> str:
    """Per-role reasons, roles with the same reason grouped: 'FLAIR, T2: exclude ...'."""
    grouped: dict[str, list[str]] = {}
    for role, why in rejections.items():
        grouped.setdefault(why, []).append(role)
    if len(grouped) == 1 and len(rejections) > 1:
        return next(iter(grouped))  # the same for every role (a localizer, too few slices)
    return "; ".join(f"{', '.join(roles)}: {why}" for why, roles in grouped.items())


def choose_series(
    headers: list[SeriesHeader], *, case_id: str, options: MriOptions,
    overrides: dict[str, str] | None = None,
) -> SeriesChoice:
    """The series of one study that serve each role, by the rules of `options` (see module).

    `overrides` (role -> SeriesInstanceUID) win over the rules, and the first found decides
    the study; one naming a series the case does not hold leaves its role empty.
    """
    roles = role_order(options)
    overrides = dict(overrides or {})
    unknown = [role for role in overrides if role not in roles]
    if unknown:
        raise ConfigError(f"series overrides of {case_id}: role(s) {unknown} are not configured "
                          f"(imaging.mri.sequences and reference: {roles})")
    looks = _looks(headers)
    studies = _studies(looks, roles, options)

    pinned: dict[str, _Look] = {}
    reasons: dict[str, str] = {}
    for role in roles:
        if role not in overrides:
            continue
        uid = overrides[role]
        look = next((lk for lk in looks if lk.header.uid == uid), None)
        if look is None:
            reasons[role] = (f"no series: the override's SeriesInstanceUID {uid} is not among "
                             f"the {len(headers)} series of {case_id}")
            continue
        pinned[role] = look
        rule = options.roles[role]
        why = _common_rejection(look.header, options) or _role_rejection(look, rule, role)
        reasons[role] = f"{_describe(look, rule)} by override" + \
            (f"; the rules would reject it: {why}" if why else "")
    first_pin = next(((lk.header.study_uid, role) for role, lk in pinned.items()
                      if not lk.header.error), None)
    study, study_reason = _choose_study(studies, roles, options, first_pin)

    chosen = dict(pinned)
    if study is not None:
        chosen = _assign(study, [r for r in roles if r not in overrides], pinned)
    taken = {look.header.folder: role for role, look in chosen.items()}
    for role, look in pinned.items():
        if study is not None and look.header.study_uid != study.uid:
            reasons[role] += f"; from another study ({look.header.study_date or 'undated'})"
    for role in roles:
        if role in reasons:
            continue
        if role in chosen:
            others = {folder: r for folder, r in taken.items() if r != role}
            reasons[role] = _ranked_reason(chosen[role], role, study, options.roles[role],
                                           others)
        else:
            reasons[role] = _empty_reason(role, study, options, taken)

    order = [*options.sequences, *(r for r in roles if r not in options.sequences)]
    table = _choice_table(looks, case_id=case_id, options=options, roles=roles, study=study,
                          study_reason=study_reason, chosen=chosen, reasons=reasons,
                          overridden=set(overrides))
    return SeriesChoice(
        folders={r: chosen[r].header.folder for r in order if r in chosen},
        reasons={r: reasons[r] for r in order},
        table=table,
        uids={r: chosen[r].header.uid for r in order if r in chosen},
        study_uid=study.uid if study is not None else "",
        study_reason=study_reason,
    )


def _row(look: _Look, case_id: str) -> dict[str, Any]:
    header = look.header
    return {
        "case_id": case_id, "StudyInstanceUID": header.study_uid,
        "StudyDate": header.study_date, "SeriesInstanceUID": header.uid,
        "SeriesNumber": header.series_number, "SeriesDescription": header.description,
        "plane": header.plane or "", "contrast": look.contrast,
        "inversion_time_ms": header.inversion_time_ms,
        "image_type": "\\".join(header.image_type), "n_slices": header.n_slices,
        "path": str(header.folder),
    }


def _choice_table(looks: list[_Look], *, case_id: str, options: MriOptions, roles: list[str],
                  study: _Study | None, study_reason: str, chosen: dict[str, _Look],
                  reasons: dict[str, str], overridden: set[str]) -> pd.DataFrame:
    """One row per series: chosen, candidate, rejected or other study, and why."""
    serving: dict[Path, list[str]] = {}
    for role, look in chosen.items():
        serving.setdefault(look.header.folder, []).append(role)
    rows = []
    for look in looks:
        header = look.header
        row = _row(look, case_id)
        if header.folder in serving:
            serves = serving[header.folder]
            row.update(status="chosen", sequence=", ".join(serves),
                       reason="; ".join(reasons[r] for r in serves))
        elif header.error:
            row.update(status="rejected", sequence="", reason=f"unreadable: {header.error}")
        elif study is None or header.study_uid != study.uid:
            row.update(status="other study", sequence="",
                       reason=f"not the chosen study; chosen: {study_reason}")
        else:
            passed = [r for r in roles if study.passes(look, r)]
            if passed:
                below = [f"{r}: the override names another series" if r in overridden
                         else f"{r}: ranked below {chosen[r].header.description!r}"
                         for r in passed]
                row.update(status="candidate", sequence=", ".join(passed),
                           reason="; ".join(below))
            else:
                row.update(status="rejected", sequence="",
                           reason=_compact(study.rejections.get(header.folder, {})))
        rows.append(row)
    return pd.DataFrame(rows, columns=CHOICE_COLUMNS)


# --- tables: overrides, series.tsv, provider listings -----------------------------------------


def read_overrides(path: Path, *, roles: Collection[str] | None = None
                   ) -> dict[tuple[str, str], str]:
    """(case_id, sequence) -> SeriesInstanceUID of an overrides TSV (series_overrides).

    `roles`, where given, are the configured roles; a row naming another is refused.
    """
    path = Path(path)
    try:
        rows = read_tsv(path, required=OVERRIDE_COLUMNS)
    except MgiError as err:
        raise ConfigError(f"imaging.mri.series_overrides: {err}") from err
    overrides: dict[tuple[str, str], str] = {}
    for number, (case_id, sequence, uid) in enumerate(
            zip(rows["case_id"], rows["sequence"], rows["SeriesInstanceUID"], strict=True),
            start=2):
        key = (case_id.strip(), sequence.strip())
        where = f"{path}: line {number}"
        if not all(key) or not uid.strip():
            raise ConfigError(f"{where}: empty case_id, sequence or SeriesInstanceUID")
        if roles is not None and key[1] not in roles:
            raise ConfigError(f"{where}: sequence {key[1]!r} is not a configured role "
                              f"({sorted(roles)})")
        if key in overrides:
            raise ConfigError(f"{where}: a second row for case {key[0]!r}, sequence {key[1]!r}")
        overrides[key] = uid.strip()
    return overrides


def write_series_table(choice: SeriesChoice, path: Path) -> Path:
    """Write the chosen series (CHOSEN_SERIES_COLUMNS), one row per role, atomically."""
    path = Path(path)
    table = choice.table
    rows = []
    for role, folder in choice.folders.items():
        uid = choice.uids.get(role, "")
        match = table[table["SeriesInstanceUID"] == uid] if len(table) else table
        first = match.iloc[0] if len(match) else None
        folder = Path(folder)
        where = folder.relative_to(path.parent) if folder.is_relative_to(path.parent) \
            else folder.absolute()
        rows.append({
            "SeriesInstanceUID": uid, "sequence": role,
            "SeriesDescription": "" if first is None else first["SeriesDescription"],
            "ImageCount": 0 if first is None else int(first["n_slices"]),
            "path": str(where), "reason": choice.reasons.get(role, ""),
        })
    return write_tsv(pd.DataFrame(rows, columns=CHOSEN_SERIES_COLUMNS), path)


def _choice_from_table(table: Path, *, case_id: str, options: MriOptions) -> SeriesChoice:
    """The choice a series.tsv records (the acquire stage's, or write_series_table's)."""
    try:
        rows = read_tsv(table, required=["SeriesInstanceUID", "sequence"])
    except MgiError as err:
        raise SeriesError(str(err)) from err
    roles = role_order(options)
    folders: dict[str, Path] = {}
    uids: dict[str, str] = {}
    reasons: dict[str, str] = {}
    looks = []
    for number, row in enumerate(rows.to_dict("records"), start=2):
        uid, role = row["SeriesInstanceUID"].strip(), row["sequence"].strip()
        if role not in roles:
            if role:
                log.info("%s: line %d: sequence %r is not configured; skipped", table, number,
                         role)
            continue
        if role in folders:
            raise SeriesError(f"{table}: line {number}: a second series for sequence {role!r}")
        where = (row.get("path") or "").strip()
        if not uid and not where:
            raise SeriesError(f"{table}: line {number}: sequence {role!r} has neither a "
                              "SeriesInstanceUID nor a path")
        folder = (Path(where) if Path(where).is_absolute() else table.parent / where) if where \
            else table.parent / uid
        if not folder.is_dir():
            raise SeriesError(f"{table}: line {number}: series {uid} ({role}) has no folder "
                              f"{folder}")
        header = read_series_header(folder)
        if not header.error and header.uid and uid and header.uid != uid:
            raise SeriesError(f"{table}: line {number}: folder {folder} holds series "
                              f"{header.uid}, not {uid}")
        folders[role], uids[role] = folder, uid
        reasons[role] = (row.get("reason") or "").strip() or f"named by {table}"
        looks.append((role, _Look(header, header.contrast, header.contrast_by)))
    records = []
    for role, look in looks:
        record = _row(look, case_id)
        record.update(status="chosen", sequence=role, reason=reasons[role])
        records.append(record)
    order = [*options.sequences, *(r for r in roles if r not in options.sequences)]
    for role in order:
        if role not in reasons and role in options.sequences:
            reasons[role] = f"no series: {table} names none"
    return SeriesChoice(
        folders={r: folders[r] for r in order if r in folders},
        reasons={r: reasons[r] for r in order if r in reasons},
        table=pd.DataFrame(records, columns=CHOICE_COLUMNS),
        uids={r: uids[r] for r in order if r in uids},
        study_reason=f"named by {table}",
    )


def choose_case_series(
    series_root: str | os.PathLike[str], *, case_id: str, options: MriOptions
) -> SeriesChoice:
    """The series of the case folder `series_root` that feed each role of `options`.

    A `series.tsv` in the folder decides where it exists; otherwise the folder is scanned and
    the rules choose, with the overrides of imaging.mri.series_overrides for `case_id`.
    """
    root = Path(series_root)
    if not root.is_dir():
        raise SeriesError(f"{root}: case folder not found")
    table = root / SERIES_TABLE
    if table.is_file():
        choice = _choice_from_table(table, case_id=case_id, options=options)
    else:
        overrides = {}
        if options.series_overrides:
            every = read_overrides(Path(options.series_overrides), roles=role_order(options))
            overrides = {role: uid for (case, role), uid in every.items() if case == case_id}
        choice = choose_series(scan_case(root), case_id=case_id, options=options,
                               overrides=overrides)
    log.info("%s: series choice: %s", case_id, choice.summary())
    return choice


def listing_candidates(listing: pd.DataFrame, *, options: MriOptions) -> pd.DataFrame:
    """The MR series of a provider listing (SeriesInstanceUID, PatientID, Modality,
    SeriesDescription, ImageCount) that could serve a role by their description, with `roles`.

    Only the words can be judged before download: description patterns, excludes, contrast
    where the words say pre or post (silent words leave it to ContrastBolusAgent later), and
    ImageCount >= min_slices. Nothing is chosen here.
    """
    missing = [c for c in ("Modality", "SeriesDescription", "ImageCount")
               if c not in listing.columns]
    if missing:
        raise SeriesError(f"series listing: missing column(s) {missing}; "
                          f"found {list(listing.columns)}")
    roles = role_order(options)
    counts = pd.to_numeric(listing["ImageCount"], errors="coerce").fillna(0)
    served = []
    for modality, description, count in zip(listing["Modality"], listing["SeriesDescription"],
                                            counts, strict=True):
        if str(modality).strip() != "MR" or count < options.min_slices:
            served.append("")
            continue
        text = normalise_text(description)
        contrast, by = contrast_of(description)
        fit = []
        for role in roles:
            rule = options.roles[role]
            if not _description_matches(text, rule, role) \
                    or _excluded_by(text, rule, role) is not None:
                continue
            if rule.contrast != "any" and by == "words" and contrast != rule.contrast:
                continue
            fit.append(role)
        served.append(", ".join(fit))
    out = listing.assign(roles=served)
    return out[out["roles"] != ""].reset_index(drop=True)
