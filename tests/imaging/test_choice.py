"""Choosing a case's DICOM series per sequence role: headers, rules, studies, overrides, tables.

Most tests build `SeriesHeader`s in memory for studies as TCIA's TCGA glioma cases hold them
(site-specific descriptions, localizers, DWI and its ADC map, perfusion, T1-weighted FLAIR,
2-D axial and 3-D sagittal post-contrast T1); a few write tiny DICOM series to disk.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from mgi.errors import ConfigError, SeriesError
from mgi.imaging.mri.choice import (
    CHOICE_COLUMNS,
    SeriesHeader,
    choose_case_series,
    choose_series,
    contrast_of,
    listing_candidates,
    read_overrides,
    read_series_header,
    scan_case,
    write_series_table,
)
from mgi.io import read_tsv
from tests.imaging.conftest import mri_options

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
_numbers = itertools.count(1)


def header(description: str, *, plane: str = "axial", ti: float | None = None, n: int = 24,
           number: int | None = None, study: str = "1.9.1", date: str = "20010101",
           image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "M", "ND"), agent: str = "",
           modality: str = "MR", error: str = "") -> SeriesHeader:
    """One series as `read_series_header` would give it (folder /case/<uid>)."""
    uid = f"1.2.{next(_numbers)}"
    return SeriesHeader(folder=Path("/case") / uid, uid=uid, study_uid=study, study_date=date,
                        series_number=number, description=description, modality=modality,
                        image_type=image_type, plane=plane, contrast_agent=agent,
                        inversion_time_ms=ti, n_slices=n, error=error)


def picked(choice, headers) -> dict[str, str]:
    """role -> description of the chosen series."""
    described = {h.folder: h.description for h in headers}
    return {role: described[folder] for role, folder in choice.folders.items()}


def row(choice, description: str) -> pd.Series:
    rows = choice.table[choice.table["SeriesDescription"] == description]
    assert len(rows) == 1, description
    return rows.iloc[0]


def choose(headers, **options):
    return choose_series(headers, case_id="TCGA-XX-0001", options=mri_options(**options))


# --- realistic studies, in memory -----------------------------------------------------------


def ge_study(**change):
    """A GE 1.5 T glioma study as TCGA-LGG holds many (series numbers in scan order)."""
    series = {
        "3 PLANE LOC": dict(n=9, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
        "SAG T1 FLAIR": dict(plane="sagittal", ti=750.0, n=22),
        "AX T2 FSE": dict(),
        "AX T2 FLAIR": dict(ti=2200.0),
        "AX T1": dict(),
        "AX DWI": dict(n=48),
        "ADC": dict(image_type=("DERIVED", "PRIMARY", "ADC")),
        "PERFUSION": dict(n=600, agent="MAGNEVIST"),
        "AX T1 POST GD": dict(agent="MAGNEVIST"),
        "COR T1 POST GD": dict(plane="coronal", n=20, agent="MAGNEVIST"),
    }
    series.update(change)
    return [header(d, number=k + 1, **kw) for k, (d, kw) in enumerate(series.items())
            if kw is not None]


def test_ge_study_chooses_axial_t1_flair_and_post_contrast_t1():
    headers = ge_study()
    choice = choose(headers)
    assert picked(choice, headers) == {"T1 pre": "AX T1", "FLAIR": "AX T2 FLAIR",
                                       "T1 post": "AX T1 POST GD"}
    assert choice.reasons["FLAIR"] == "'AX T2 FLAIR' (axial, TI 2200 ms, 24 slices); the only " \
                                      "candidate"
    assert choice.reasons["T1 pre"] == ("'AX T1' (axial, pre-contrast by default, 24 slices); "
                                        "2 candidates, ranked first by plane")
    assert "ranked first by plane" in choice.reasons["T1 post"]
    table = choice.table
    assert list(table.columns) == CHOICE_COLUMNS and len(table) == len(headers)
    assert (table["case_id"] == "TCGA-XX-0001").all()
    assert row(choice, "AX T2 FLAIR")[["status", "sequence"]].tolist() == ["chosen", "FLAIR"]
    assert row(choice, "AX T2 FLAIR")["reason"] == choice.reasons["FLAIR"]
    assert row(choice, "3 PLANE LOC")["status"] == "rejected"
    assert row(choice, "3 PLANE LOC")["reason"] == "localizer (ImageType LOCALIZER)"
    assert row(choice, "ADC")["reason"] == "ImageType DERIVED (allow_derived is false)"
    assert row(choice, "AX DWI")["reason"] == "description matches no pattern"
    assert row(choice, "PERFUSION")["reason"] == "description matches no pattern"
    sag = row(choice, "SAG T1 FLAIR")
    assert sag[["status", "sequence"]].tolist() == ["candidate", "T1 pre"]
    assert sag["reason"] == "T1 pre: ranked below 'AX T1'"
    assert row(choice, "COR T1 POST GD")["status"] == "candidate"
    assert row(choice, "AX T2 FSE")["reason"] == "description matches no pattern"  # every role


def test_t1_weighted_flair_is_not_the_flair_and_sagittal_flair_stands_in():
    headers = ge_study(**{"AX T2 FLAIR": None, "SAG FLAIR": dict(plane="sagittal", ti=2400.0,
                                                                  n=160)})
    choice = choose(headers)
    assert picked(choice, headers)["FLAIR"] == "SAG FLAIR"
    assert choice.reasons["FLAIR"].startswith("'SAG FLAIR' (sagittal, TI 2400 ms, 160 slices)")
    assert row(choice, "SAG T1 FLAIR")[["status", "sequence"]].tolist() == ["candidate",
                                                                           "T1 pre"]


def test_flair_described_so_but_with_a_t1_inversion_time_is_refused_naming_it():
    headers = [header("AX T1"), header("AX FLAIR", ti=800.0), header("AX T1 +C")]
    choice = choose(headers)
    assert "FLAIR" not in choice.folders
    assert choice.reasons["FLAIR"] == ("no series: 'AX FLAIR' rejected: InversionTime 800 ms "
                                       "outside [1400, 4000]")
    assert row(choice, "AX FLAIR")[["status", "reason"]].tolist() == [
        "rejected", "FLAIR: InversionTime 800 ms outside [1400, 4000]; "
                    "T1 pre, T1 post: description matches no pattern"]
    # the inversion time is checked only where the series records one
    headers = [header("AX T1"), header("AX FLAIR"), header("AX T1 +C")]
    assert picked(choose(headers), headers)["FLAIR"] == "AX FLAIR"


def test_axial_flair_beats_a_sagittal_3d_flair_with_more_slices():
    headers = [header("SAG 3D FLAIR", plane="sagittal", ti=1800.0, n=176, number=3),
               header("T2_FLAIR_AX", ti=2500.0, n=24, number=7)]
    choice = choose(headers)
    assert picked(choice, headers)["FLAIR"] == "T2_FLAIR_AX"
    assert "2 candidates, ranked first by plane" in choice.reasons["FLAIR"]


def test_ties_in_plane_go_to_more_slices_then_the_lower_series_number():
    headers = [header("AX FLAIR", n=20, number=5), header("AX FLAIR FS", n=28, number=9)]
    choice = choose(headers)
    assert picked(choice, headers)["FLAIR"] == "AX FLAIR FS"
    assert "ranked first by slices" in choice.reasons["FLAIR"]
    headers = [header("AX FLAIR", number=9), header("FLAIR AXIAL", number=5)]
    choice = choose(headers)
    assert picked(choice, headers)["FLAIR"] == "FLAIR AXIAL"
    assert "ranked first by SeriesNumber" in choice.reasons["FLAIR"]


def test_sagittal_3d_post_contrast_t1_serves_when_no_axial_post_exists():
    headers = [header("AX FLAIR", ti=2200.0), header("T1 AXIAL SE"),
               header("3D SPGR POST GAD", plane="sagittal", n=124)]
    assert picked(choose(headers), headers) == {
        "T1 pre": "T1 AXIAL SE", "FLAIR": "AX FLAIR", "T1 post": "3D SPGR POST GAD"}
    headers.append(header("Ax T1 +C"))
    assert picked(choose(headers), headers)["T1 post"] == "Ax T1 +C"


def test_siemens_study_with_its_own_names():
    headers = [
        header("localizer", plane="sagittal", n=3),
        header("t2_tse_tra"),
        header("t2_tirm_tra_dark-fluid", ti=2500.0),
        header("ep2d_diff_3scan_trace_p2", n=57),
        header("ep2d_diff_3scan_trace_p2_ADC", image_type=("DERIVED", "PRIMARY", "DIFFUSION")),
        header("t1_se_tra"),
        header("t1_mprage_sag_p2_iso_post", plane="sagittal", n=176, agent="Gadavist"),
    ]
    assert picked(choose(headers), headers) == {
        "T1 pre": "t1_se_tra", "FLAIR": "t2_tirm_tra_dark-fluid",
        "T1 post": "t1_mprage_sag_p2_iso_post"}
    # a T2 role, configured, takes the TSE and not the dark-fluid FLAIR
    choice = choose(headers, sequences=("T2", "FLAIR"))
    assert picked(choice, headers) == {"T2": "t2_tse_tra", "FLAIR": "t2_tirm_tra_dark-fluid"}


def test_the_demo_descriptions_are_chosen_without_contrast_tags():
    headers = [header("T1 pre", n=12, number=1), header("FLAIR", ti=2500.0, n=12, number=2),
               header("T1 post", n=12, number=3)]
    choice = choose(headers)
    assert picked(choice, headers) == {"T1 pre": "T1 pre", "FLAIR": "FLAIR", "T1 post": "T1 post"}
    assert list(choice.folders) == ["T1 pre", "FLAIR", "T1 post"]  # the channel order
    assert "post-contrast by words" in choice.reasons["T1 post"]


@pytest.mark.parametrize(("description", "agent", "expected"), [
    ("T1 pre", "", ("pre", "words")),
    ("T1 post", "", ("post", "words")),
    ("Ax T1 +C", "", ("post", "words")),
    ("AX T1 C+", "", ("post", "words")),
    ("AX T1 + C", "", ("post", "words")),
    ("T1_POST_GD", "", ("post", "words")),
    ("AX T1 POST GD", "", ("post", "words")),
    ("3D SPGR POST GAD", "", ("post", "words")),
    ("AX T1 W/ GADO", "", ("post", "words")),
    ("T1 WITH CONTRAST", "", ("post", "words")),
    ("T1CE", "", ("post", "words")),
    ("T1 PRE GAD", "", ("pre", "words")),  # pre-words first: GAD names the agent to come
    ("AX T1 W/O", "", ("pre", "words")),
    ("AX T1 NON-CONTRAST", "", ("pre", "words")),
    ("T1 WITHOUT", "", ("pre", "words")),
    ("AX T1 PRECONTRAST", "MAGNEVIST", ("pre", "words")),  # words beat the tag
    ("AX T1", "MAGNEVIST", ("post", "ContrastBolusAgent")),
    ("AX T1", "", ("pre", "default")),
    ("AX T1 POST OP", "", ("pre", "default")),  # after surgery, not after an injection
    ("T1 SPACE PRESAT", "", ("pre", "default")),  # no word inside another
    ("POSTERIOR FOSSA T1", "", ("pre", "default")),
])
def test_contrast_from_words_then_the_agent_tag(description, agent, expected):
    assert contrast_of(description, agent) == expected
    assert header(description, agent=agent).contrast == expected[0]


def test_agent_filled_on_every_series_of_a_study_is_ignored():
    # this site fills ContrastBolusAgent on every series, the localizer and the plain T1 too
    headers = [header("3 PLANE LOC", agent="GADAVIST",
                      image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
               header("AX FLAIR", ti=2200.0, agent="GADAVIST"),
               header("AX T1", agent="GADAVIST"),
               header("AX T1 +C", agent="GADAVIST")]
    choice = choose(headers)
    assert picked(choice, headers) == {"T1 pre": "AX T1", "FLAIR": "AX FLAIR",
                                       "T1 post": "AX T1 +C"}
    assert "ContrastBolusAgent on every series" in choice.reasons["T1 pre"]
    # where the tag is filled only after the injection, it is believed
    headers[0] = header("3 PLANE LOC", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    choice = choose(headers[:3])
    assert picked(choice, headers[:3]) == {"FLAIR": "AX FLAIR", "T1 post": "AX T1"}
    assert choice.reasons["T1 pre"] == ("no series: 'AX T1' rejected: post-contrast (by "
                                        "ContrastBolusAgent), wants pre")


def test_non_mr_unreadable_and_small_series_are_rejected_naming_why():
    headers = [header("AX FLAIR", ti=2000.0), header("AX T1", modality="CT"),
               header("AX T1 +C", n=2), header("", error="/case/x: not a DICOM file"),
               header("AX T1 PRE", plane=None)]
    choice = choose(headers)
    assert picked(choice, headers) == {"FLAIR": "AX FLAIR"}
    assert row(choice, "AX T1")["reason"] == "Modality CT, not MR"
    assert row(choice, "AX T1 +C")["reason"] == "2 slices < min_slices 3"
    assert row(choice, "")[["status", "reason"]].tolist() == [
        "rejected", "unreadable: /case/x: not a DICOM file"]
    assert row(choice, "AX T1 PRE")["reason"] == "no ImageOrientationPatient (plane unknown)"
    assert choice.reasons["T1 post"] == (
        "no series: 'AX T1' rejected: Modality CT, not MR; 'AX T1 +C' rejected: 2 slices < "
        "min_slices 3; 'AX T1 PRE' rejected: no ImageOrientationPatient (plane unknown)")
    # allow_derived lets an ADC-like derived series through
    derived = [header("AX FLAIR REFORMAT", image_type=("DERIVED", "SECONDARY"))]
    assert "FLAIR" not in choose(derived).folders
    assert "FLAIR" in choose(derived, allow_derived=True).folders


def test_planes_restrict_and_order_a_role():
    headers = [header("COR FLAIR", plane="coronal"), header("SAG FLAIR", plane="sagittal")]
    roles = {"FLAIR": {"description": ["flair"], "planes": ["sagittal"]}}
    choice = choose(headers, roles=roles, sequences=("FLAIR",))
    assert picked(choice, headers) == {"FLAIR": "SAG FLAIR"}
    assert row(choice, "COR FLAIR")["reason"] == "FLAIR: coronal plane not in ['sagittal']"


def test_one_series_serves_one_role_and_the_reference_goes_first():
    roles = {"FLAIR": {"description": ["flair"]}, "T2": {"description": ["t2"]}}
    only = [header("AX T2 FLAIR")]
    # T2 comes first in the channel order, but the reference (FLAIR) is filled first
    choice = choose(only, roles=roles, sequences=("T2", "FLAIR"))
    assert picked(choice, only) == {"FLAIR": "AX T2 FLAIR"}
    assert choice.reasons["T2"] == "no series: 'AX T2 FLAIR' serves FLAIR"
    both = [header("AX T2 FLAIR", number=4), header("AX T2 FSE", number=3)]
    choice = choose(both, roles=roles, sequences=("T2", "FLAIR"))
    assert picked(choice, both) == {"T2": "AX T2 FSE", "FLAIR": "AX T2 FLAIR"}
    assert list(choice.folders) == ["T2", "FLAIR"]
    assert choice.reasons["T2"].endswith("the only candidate (other candidates serve FLAIR)")


def test_the_reference_is_chosen_even_when_not_a_channel():
    headers = [header("AX FLAIR", ti=2000.0), header("AX T1 +C")]
    choice = choose(headers, sequences=("T1 post",), reference="FLAIR")
    assert picked(choice, headers) == {"T1 post": "AX T1 +C", "FLAIR": "AX FLAIR"}


# --- studies --------------------------------------------------------------------------------


def two_studies():
    early = [header("AX FLAIR", ti=2200.0, study="1.9.1", date="20020301"),
             header("AX T1", study="1.9.1", date="20020301")]
    late = [header("AX T2 FLAIR", ti=2200.0, study="1.9.2", date="20030415"),
            header("AX T1 PRE", study="1.9.2", date="20030415"),
            header("AX T1 POST", study="1.9.2", date="20030415")]
    return early, late


def test_the_earliest_study_with_a_flair_is_chosen():
    early, late = two_studies()
    headers = late + early  # the order given does not matter
    choice = choose(headers)
    assert picked(choice, headers) == {"T1 pre": "AX T1", "FLAIR": "AX FLAIR"}
    assert choice.study_uid == "1.9.1"
    assert choice.study_reason.startswith("study 20020301 (1.9.1): the earliest with a FLAIR")
    assert choice.reasons["T1 post"] == ("no series: 'AX T1' rejected: pre-contrast (by "
                                         "default), wants post")
    other = choice.table[choice.table["StudyInstanceUID"] == "1.9.2"]
    assert (other["status"] == "other study").all() and len(other) == 3
    # without a FLAIR in the early study, the later one is chosen
    no_flair = [h for h in early if "FLAIR" not in h.description]
    assert choose(late + no_flair).study_uid == "1.9.2"
    # undated studies come last
    undated = [header("AX FLAIR", ti=2200.0, study="1.9.0", date="")]
    assert choose(undated + late).study_uid == "1.9.2"


def test_the_earliest_study_with_any_candidate_when_none_has_a_flair():
    headers = [header("AX T1", study="1.9.2", date="20030101"),
               header("AX DWI", study="1.9.1", date="20020101")]
    choice = choose(headers)
    assert choice.study_uid == "1.9.2" and "no study has a FLAIR candidate" in \
        choice.study_reason
    assert choice.reasons["FLAIR"] == ("no series: no description of the 1 series of study "
                                       "20030101 (1.9.2) matches ['flair', 'dark ?fluid']")


def test_most_complete_study_fills_most_roles_ties_to_the_earliest():
    early, late = two_studies()
    choice = choose(early + late, study="most_complete")
    assert choice.study_uid == "1.9.2"
    assert picked(choice, early + late) == {"T1 pre": "AX T1 PRE", "FLAIR": "AX T2 FLAIR",
                                            "T1 post": "AX T1 POST"}
    assert "fills 3 of 3 roles" in choice.study_reason
    tied = [header("AX FLAIR", study="1.9.4", date="20050101"),
            header("AX FLAIR", study="1.9.3", date="20040101")]
    assert choose(tied, study="most_complete").study_uid == "1.9.3"


# --- overrides ------------------------------------------------------------------------------


def test_an_override_wins_even_over_a_rejecting_rule():
    headers = ge_study()
    uid = next(h.uid for h in headers if h.description == "SAG T1 FLAIR")
    choice = choose_series(headers, case_id="c", options=mri_options(),
                           overrides={"FLAIR": uid})
    assert picked(choice, headers)["FLAIR"] == "SAG T1 FLAIR"
    assert choice.reasons["FLAIR"] == (
        "'SAG T1 FLAIR' (sagittal, TI 750 ms, 22 slices) by override; the rules would reject "
        "it: exclude '\\\\bt1(?!\\\\d)' matches")
    # the rules fill the other roles, and the overridden series serves no other role
    assert picked(choice, headers)["T1 pre"] == "AX T1"
    assert row(choice, "AX T2 FLAIR")[["status", "reason"]].tolist() == [
        "candidate", "FLAIR: the override names another series"]


def test_an_override_naming_an_unknown_uid_leaves_the_role_empty():
    headers = ge_study()
    choice = choose_series(headers, case_id="c", options=mri_options(),
                           overrides={"FLAIR": "9.9.9"})
    assert "FLAIR" not in choice.folders
    assert choice.reasons["FLAIR"] == ("no series: the override's SeriesInstanceUID 9.9.9 is "
                                       f"not among the {len(headers)} series of c")
    assert row(choice, "AX T2 FLAIR")[["status", "sequence"]].tolist() == ["candidate", "FLAIR"]
    assert row(choice, "AX T2 FLAIR")["reason"] == "FLAIR: the override names another series"


def test_an_override_decides_the_study():
    early, late = two_studies()
    uid = next(h.uid for h in late if h.description == "AX T1 POST")
    choice = choose_series(early + late, case_id="c", options=mri_options(),
                           overrides={"T1 post": uid})
    assert choice.study_uid == "1.9.2" and "holds the override for T1 post" in \
        choice.study_reason
    assert picked(choice, early + late)["FLAIR"] == "AX T2 FLAIR"


def test_an_override_for_an_unconfigured_role_is_refused():
    with pytest.raises(ConfigError, match=r"role\(s\) \['T2'\] are not configured"):
        choose_series(ge_study(), case_id="c", options=mri_options(), overrides={"T2": "1"})


def _tsv(path: Path, text: str) -> Path:
    path.write_text(text.replace("|", "\t"))
    return path


def test_read_overrides_and_its_errors(tmp_path):
    good = _tsv(tmp_path / "o.tsv", "case_id|sequence|SeriesInstanceUID\nA|FLAIR|1.2\n"
                                    "A|T1 post|1.3\nB|FLAIR|1.4\n")
    assert read_overrides(good, roles=("FLAIR", "T1 post")) == {
        ("A", "FLAIR"): "1.2", ("A", "T1 post"): "1.3", ("B", "FLAIR"): "1.4"}
    with pytest.raises(ConfigError, match=r"o\.tsv: line 3: sequence 'T1 post' is not a "
                                          r"configured role"):
        read_overrides(good, roles=("FLAIR",))
    missing = _tsv(tmp_path / "m.tsv", "case_id|sequence|uid\nA|FLAIR|1.2\n")
    with pytest.raises(ConfigError, match=r"m\.tsv: missing column\(s\) \['SeriesInstanceUID'\]"):
        read_overrides(missing)
    twice = _tsv(tmp_path / "d.tsv", "case_id|sequence|SeriesInstanceUID\nA|FLAIR|1.2\n"
                                     "A|FLAIR|1.3\n")
    with pytest.raises(ConfigError, match=r"d\.tsv: line 3: a second row for case 'A', "
                                          r"sequence 'FLAIR'"):
        read_overrides(twice)
    with pytest.raises(ConfigError, match=r"absent\.tsv: file not found"):
        read_overrides(tmp_path / "absent.tsv")


# --- on disk --------------------------------------------------------------------------------


def write_series(folder: Path, writers, *, description: str, n: int = 4,
                 orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), uid: str | None = None,
                 **tags) -> str:
    """A tiny classic MR series of `n` 4x4 slices in `folder`; returns its SeriesInstanceUID."""
    uid = uid or generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    for k in range(n):
        writers.slice(folder / f"IM{k:04d}.dcm", np.full((4, 4), 60 + k),
                      position=tuple(float(v) for v in normal * 3.0 * k), instance=k + 1,
                      series_uid=uid, description=description, orientation=orientation, **tags)
    return uid


def test_read_series_header_of_a_classic_series(tmp_path, dicom_writers):
    folder = tmp_path / "s"
    uid = write_series(folder, dicom_writers, description="AX T2 FLAIR", n=5,
                       StudyInstanceUID="1.9.7", StudyDate="20010203", SeriesNumber=4,
                       ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], InversionTime=2200.0,
                       MRAcquisitionType="2D", FrameOfReferenceUID="1.9.8",
                       ContrastBolusAgent="")
    got = read_series_header(folder)
    assert (got.folder, got.uid, got.study_uid, got.study_date, got.series_number) == \
        (folder, uid, "1.9.7", "20010203", 4)
    assert (got.description, got.modality, got.image_type, got.plane) == \
        ("AX T2 FLAIR", "MR", ("ORIGINAL", "PRIMARY", "M", "ND"), "axial")
    assert (got.inversion_time_ms, got.n_slices, got.mr_acquisition_type,
            got.frame_of_reference, got.contrast, got.contrast_agent, got.error) == \
        (2200.0, 5, "2D", "1.9.8", "pre", "", "")


def test_read_series_header_planes_protocol_name_and_agent(tmp_path, dicom_writers):
    sag = tmp_path / "sag"
    write_series(sag, dicom_writers, description="", orientation=SAGITTAL,
                 ProtocolName="3D SPGR", ContrastBolusAgent="MAGNEVIST")
    got = read_series_header(sag)
    assert (got.plane, got.description, got.contrast_agent, got.contrast) == \
        ("sagittal", "3D SPGR", "MAGNEVIST", "post")
    cor = tmp_path / "cor"
    write_series(cor, dicom_writers, description="COR T1", orientation=CORONAL)
    assert read_series_header(cor).plane == "coronal"
    oblique = tmp_path / "obl"  # axial tilted by 20 degrees: still axial
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    write_series(oblique, dicom_writers, description="AX T1", orientation=(1, 0, 0, 0, c, s))
    assert read_series_header(oblique).plane == "axial"
    bare = tmp_path / "bare"
    write_series(bare, dicom_writers, description="AX T1", ImageOrientationPatient=None)
    assert read_series_header(bare).plane is None


def test_read_series_header_of_an_enhanced_mr_object(tmp_path, dicom_writers):
    path = dicom_writers.enhanced(tmp_path / "e" / "enh.dcm", np.full((7, 4, 4), 60),
                                  z=[float(k) for k in range(7)], description="AX FLAIR")
    ds = pydicom.dcmread(path)
    modifier = Dataset()
    modifier.InversionTimes = [2400.0]
    ds.SharedFunctionalGroupsSequence[0].MRModifierSequence = Sequence([modifier])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.save_as(path, enforce_file_format=True)
    got = read_series_header(path.parent)
    assert (got.n_slices, got.plane, got.inversion_time_ms, got.error) == (7, "axial", 2400.0, "")
    # without the shared orientation and modifier, the first frame's groups are read
    del ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence
    del ds.SharedFunctionalGroupsSequence[0].MRModifierSequence
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(SAGITTAL)
    ds.PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence = Sequence([orientation])
    ds.save_as(path, enforce_file_format=True)
    got = read_series_header(path.parent)
    assert (got.plane, got.inversion_time_ms) == ("sagittal", None)


def test_read_series_header_names_why_a_folder_cannot_serve(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not DICOM")
    got = read_series_header(notes)
    assert got.error.startswith(f"{notes}: no DICOM file among its only file (")
    assert "readme.txt" in got.error
    assert read_series_header(tmp_path / "absent").error == \
        f"{tmp_path / 'absent'}: series folder not found"


def test_scan_case_finds_series_at_any_depth(tmp_path, dicom_writers):
    case = tmp_path / "TCGA-XX-0001"
    study = case / "1.9.1-MRI BRAIN"  # TCIA style: patient/study/series
    flair = write_series(study / "3.000000-AX FLAIR-12345", dicom_writers,
                         description="AX FLAIR", InversionTime=2200.0)
    t1 = write_series(study / "4.000000-AX T1-23456", dicom_writers, description="AX T1")
    (study / "4.000000-AX T1-23456" / ".DS_Store").write_text("hidden")
    (case / "DICOMDIR").write_bytes(b"skipped")
    (case / ".partial-x").mkdir()
    (case / ".partial-x" / "junk.dcm").write_text("hidden folder")
    broken = study / "9.000000-broken"
    broken.mkdir()
    (broken / "1.dcm").write_bytes(b"\x00" * 300)
    mixed = study / "5.000000-mixed"
    write_series(mixed, dicom_writers, description="AX T1 +C", n=2)
    dicom_writers.slice(mixed / "zz.dcm", np.full((4, 4), 60), position=(0, 0, 9),
                        instance=9, series_uid=generate_uid(), description="other")
    headers = scan_case(case)
    assert [h.folder.name for h in headers] == [
        "3.000000-AX FLAIR-12345", "4.000000-AX T1-23456", "5.000000-mixed", "9.000000-broken"]
    assert [h.uid for h in headers[:2]] == [flair, t1]
    assert headers[1].n_slices == 4 and headers[0].error == "" and headers[1].error == ""
    assert "files of 2 series" in headers[2].error
    assert "9.000000-broken" in headers[3].error and "DICOM" in headers[3].error
    choice = choose_series(headers, case_id="TCGA-XX-0001", options=mri_options())
    assert choice.folders == {"T1 pre": headers[1].folder, "FLAIR": headers[0].folder}
    assert row(choice, "AX T1 +C")["reason"].startswith("unreadable: ")
    with pytest.raises(SeriesError, match="absent: case folder not found"):
        scan_case(tmp_path / "absent")


def dicom_case(root: Path, writers) -> dict[str, str]:
    """A case folder of one series per UID-named folder: description -> UID."""
    uids = {}
    for description, tags in [("AX T2 FLAIR", {"InversionTime": 2200.0}), ("AX T1", {}),
                              ("AX T1 POST GD", {}), ("SAG T1 FLAIR", {"InversionTime": 750.0})]:
        uid = generate_uid()
        orientation = SAGITTAL if description.startswith("SAG") else (1, 0, 0, 0, 1, 0)
        write_series(root / uid, writers, description=description, uid=uid,
                     orientation=orientation, StudyDate="20010101", **tags)
        uids[description] = uid
    return uids


def test_series_table_round_trip(tmp_path, dicom_writers):
    root = tmp_path / "CASE-1"
    uids = dicom_case(root, dicom_writers)
    options = mri_options()
    chosen = choose_case_series(root, case_id="CASE-1", options=options)
    assert chosen.uids == {"T1 pre": uids["AX T1"], "FLAIR": uids["AX T2 FLAIR"],
                           "T1 post": uids["AX T1 POST GD"]}
    path = write_series_table(chosen, root / "series.tsv")
    table = read_tsv(path)
    assert list(table.columns) == ["SeriesInstanceUID", "sequence", "SeriesDescription",
                                   "ImageCount", "path", "reason"]
    assert table["path"].tolist() == [uids["AX T1"], uids["AX T2 FLAIR"],
                                      uids["AX T1 POST GD"]]  # relative: the case may move
    assert table["ImageCount"].tolist() == ["4", "4", "4"]
    again = choose_case_series(root, case_id="CASE-1", options=options)
    assert again.folders == chosen.folders and again.reasons == chosen.reasons
    assert again.uids == chosen.uids
    assert again.table["status"].tolist() == ["chosen"] * 3
    # the table decides, even against the rules
    _tsv(root / "series.tsv", f"SeriesInstanceUID|sequence\n{uids['SAG T1 FLAIR']}|FLAIR\n")
    again = choose_case_series(root, case_id="CASE-1", options=options)
    assert again.folders == {"FLAIR": root / uids["SAG T1 FLAIR"]}
    assert again.reasons["FLAIR"] == f"named by {root / 'series.tsv'}"
    assert again.reasons["T1 pre"] == f"no series: {root / 'series.tsv'} names none"


def test_series_table_with_folders_elsewhere(tmp_path, dicom_writers):
    root = tmp_path / "CASE-1"
    uids = dicom_case(root, dicom_writers)
    chosen = choose_case_series(root, case_id="CASE-1", options=mri_options())
    elsewhere = tmp_path / "tables" / "series.tsv"
    write_series_table(chosen, elsewhere)
    assert read_tsv(elsewhere)["path"].tolist()[1] == str(root / uids["AX T2 FLAIR"])
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "series.tsv").write_bytes(elsewhere.read_bytes())
    assert choose_case_series(moved, case_id="CASE-1", options=mri_options()).folders == \
        chosen.folders


def test_series_table_errors_name_the_table(tmp_path, dicom_writers):
    root = tmp_path / "CASE-1"
    uids = dicom_case(root, dicom_writers)
    table = root / "series.tsv"
    _tsv(table, "SeriesInstanceUID|sequence\n1.2.3|FLAIR\n")
    with pytest.raises(SeriesError, match=r"series\.tsv: line 2: series 1\.2\.3 \(FLAIR\) has "
                                          r"no folder .*1\.2\.3"):
        choose_case_series(root, case_id="CASE-1", options=mri_options())
    _tsv(table, f"SeriesInstanceUID|sequence|path\n1.2.3|FLAIR|{uids['AX T1']}\n")
    with pytest.raises(SeriesError, match=rf"line 2: folder .* holds series {uids['AX T1']}, "
                                          r"not 1\.2\.3"):
        choose_case_series(root, case_id="CASE-1", options=mri_options())
    _tsv(table, f"SeriesInstanceUID|sequence\n{uids['AX T1']}|T1 pre\n"
                f"{uids['AX T1 POST GD']}|T1 pre\n")
    with pytest.raises(SeriesError, match=r"line 3: a second series for sequence 'T1 pre'"):
        choose_case_series(root, case_id="CASE-1", options=mri_options())
    _tsv(table, "uid|sequence\n")
    with pytest.raises(SeriesError, match=r"series\.tsv: missing column\(s\) "
                                          r"\['SeriesInstanceUID'\]"):
        choose_case_series(root, case_id="CASE-1", options=mri_options())
    with pytest.raises(SeriesError, match="absent: case folder not found"):
        choose_case_series(tmp_path / "absent", case_id="CASE-1", options=mri_options())


def test_choose_case_series_applies_the_configured_overrides(tmp_path, dicom_writers):
    root = tmp_path / "CASE-1"
    uids = dicom_case(root, dicom_writers)
    overrides = _tsv(tmp_path / "overrides.tsv",
                     f"case_id|sequence|SeriesInstanceUID\nCASE-1|T1 pre|{uids['SAG T1 FLAIR']}\n"
                     f"CASE-2|FLAIR|{uids['AX T1']}\n")
    options = mri_options(series_overrides=str(overrides))
    choice = choose_case_series(root, case_id="CASE-1", options=options)
    assert choice.uids == {"T1 pre": uids["SAG T1 FLAIR"], "FLAIR": uids["AX T2 FLAIR"],
                           "T1 post": uids["AX T1 POST GD"]}
    assert choice.reasons["T1 pre"].endswith("by override")
    bad = _tsv(tmp_path / "bad.tsv", "case_id|sequence|SeriesInstanceUID\nCASE-1|T2|1.2\n")
    with pytest.raises(ConfigError, match=r"bad\.tsv: line 2: sequence 'T2' is not a "
                                          r"configured role"):
        choose_case_series(root, case_id="CASE-1",
                           options=mri_options(series_overrides=str(bad)))


# --- provider listings, before download ---------------------------------------------------


def test_listing_candidates_keeps_what_could_serve_a_role():
    listing = pd.DataFrame(
        [("1", "P1", "MR", "3 PLANE LOC", 2), ("2", "P1", "MR", "AX T2 FLAIR", 24),
         ("3", "P1", "MR", "AX T1 FLAIR", 24), ("4", "P1", "MR", "AX T1", 24),
         ("5", "P1", "MR", "Ax T1 +C", 24), ("6", "P1", "MR", "AX DWI", 48),
         ("7", "P1", "MR", "ADC", 24), ("8", "P1", "MR", "PERFUSION", 600),
         ("9", "P1", "SEG", "AX FLAIR", 24), ("10", "P1", "MR", "3D SPGR", 124),
         ("11", "P1", "MR", "AX FLAIR", 2), ("12", "P1", "MR", "t2_tirm_tra_dark-fluid", 30)],
        columns=["SeriesInstanceUID", "PatientID", "Modality", "SeriesDescription",
                 "ImageCount"])
    kept = listing_candidates(listing, options=mri_options())
    assert dict(zip(kept["SeriesDescription"], kept["roles"], strict=True)) == {
        "AX T2 FLAIR": "FLAIR",
        "AX T1 FLAIR": "T1 pre, T1 post",  # not a FLAIR; the words are silent on contrast
        "AX T1": "T1 pre, T1 post",  # the tag may decide after the download
        "Ax T1 +C": "T1 post",
        "3D SPGR": "T1 pre, T1 post",
        "t2_tirm_tra_dark-fluid": "FLAIR",
    }
    assert list(kept.columns) == [*listing.columns, "roles"]
    assert len(listing) == 12  # the listing itself is left as it was
