"""Peak memory of the current process, the fresh worker processes that read it, and the command
line of the benchmarks that time their runs in such workers."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """High-water resident set size of this process (MB).

    Read from /proc/self/status (VmHWM), which starts afresh at exec; ru_maxrss would carry
    the parent's peak into a worker process on Linux. Elsewhere, ru_maxrss is the fallback.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, *args: str) -> dict:
    """Run `python script --worker *args` in a fresh process; return the JSON of its last line."""
    out = subprocess.run(
        [sys.executable, script, "--worker", *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_arguments(
    doc: str, *, quick: str, worker: tuple[str, str], argv: list[str] | None = None,
    device: bool = False,
) -> argparse.Namespace:
    """--quick (help text `quick`), --repeats, --threads, the hidden --worker NAME NAME and,
    with `device`, --device cpu|cuda."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--worker", nargs=2, metavar=worker, help=argparse.SUPPRESS)
    if device:
        parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                            help="where the contenders run")
    return parser.parse_args(argv)


def print_result(result: dict, args: argparse.Namespace) -> dict:
    """Print the summary line (with the run's threads and repeats) and return it."""
    result |= {"threads": args.threads, "repeats": args.repeats}
    print(json.dumps(result))
    return result
