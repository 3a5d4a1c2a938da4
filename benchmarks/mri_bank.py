"""What banking one realistic MR study costs, against reading its chosen series alone.

A study as TCIA delivers it (`mgi.acquire.studies.write_study`, 256 px: 3-plane localizer, FLAIR,
T1, T2, DWI and ADC, a sagittal FLAIR and a coronal post-contrast T1 besides the axial one; the
sequences on different grids) is banked by `build_mri_bank` three ways, in one process:

- ours: the bank as the workflow makes it with `register: none` (series chosen from the DICOM
  tags, every sequence resampled onto the FLAIR's grid by its geometry, normalised, written);
- registered: the same with `register: rigid` (the TCGA cohort files' setting);
- baseline / limit: reading the three chosen series alone (pydicom decode into volumes), the
  floor of any banking of this study.

The stages of ours are timed too (choice = reading every series' header and choosing; resample
= `align_to_reference`; register = the same with rigid registration), so the line says what
each costs. One thread for SimpleITK, NumPy and the image codecs; runs alternated and repeated,
medians kept. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(variable, "1")

from mgi.acquire.studies import write_study  # noqa: E402
from mgi.imaging.mri import build_mri_bank, read_series  # noqa: E402
from mgi.imaging.mri.choice import choose_series, scan_case  # noqa: E402
from mgi.imaging.mri.grid import align_to_reference  # noqa: E402
from mgi.options import MriOptions, build  # noqa: E402


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="matrix of the study's series")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="128 px, 1 repeat")
    args = parser.parse_args(argv)
    size, repeats = (128, 1) if args.quick else (args.size, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth = write_study(root / "studies", case_id="TCGA-BM-0001", kind="standard",
                            site="ge", size=size)
        n_series = len(truth.series)
        n_files = sum(1 for _ in truth.patient_dir.rglob("*.dcm"))
        options = {register: build(MriOptions, {"image_px": 256, "register": register},
                                   where="imaging.mri") for register in ("none", "rigid")}
        roles = options["none"].sequences
        folders = [truth.folder(role) for role in roles]

        def bank(register: str) -> dict:
            return build_mri_bank(image_id="b", case_id=truth.case_id,
                                  series_root=truth.patient_dir, mask_dir=None,
                                  out_path=root / f"bank-{register}.h5",
                                  options=options[register])

        def read_alone() -> list:
            return [read_series(folder) for folder in folders]

        def choose() -> None:
            choose_series(scan_case(truth.patient_dir), case_id=truth.case_id,
                          options=options["none"])

        series = dict(zip(roles, read_alone(), strict=True))

        def align(register: str) -> None:
            align_to_reference(series, reference="FLAIR", register=register)

        for register in ("none", "rigid"):  # warm-up, and the banks must be ok
            row = bank(register)
            if row["status"] != "ok":
                raise SystemExit(f"bank with register {register} failed: {row['reason']}")
        times: dict[str, list[float]] = {k: [] for k in
                                         ("ours", "registered", "read", "choice", "resample",
                                          "register")}
        for _ in range(repeats):
            times["read"].append(_timed(read_alone))
            times["ours"].append(_timed(lambda: bank("none")))
            times["registered"].append(_timed(lambda: bank("rigid")))
            times["choice"].append(_timed(choose))
            times["resample"].append(_timed(lambda: align("none")))
            times["register"].append(_timed(lambda: align("rigid")))
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "name": "mri_bank", "ours_s": round(median["ours"], 3),
        "baseline": "reading the 3 chosen series alone (pydicom decode into volumes)",
        "baseline_s": round(median["read"], 3),
        "ratio": round(median["read"] / median["ours"], 3),
        "limit_s": round(median["read"], 3), "n": 1, "unit": "patients",
        "registered_s": round(median["registered"], 3),
        "choice_s": round(median["choice"], 3), "resample_s": round(median["resample"], 3),
        "register_s": round(median["register"], 3), "size_px": size, "series": n_series,
        "files": n_files, "threads": 1, "repeats": repeats,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
