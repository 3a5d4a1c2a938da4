"""Peak memory of the current process, for the benchmarks' worker processes."""

from __future__ import annotations

import resource
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
