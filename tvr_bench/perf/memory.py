"""Peak resident memory of a benchmark call, measured from a reset high-water mark.

`ru_maxrss` is a high-water mark since the process started: transient allocations made while importing
or building inputs can stay above everything a small scorer allocates later, which then shows no extra
memory at all. On Linux, writing 5 to /proc/self/clear_refs resets the mark to the current RSS, so
`reset_peak_rss()` right before a call and `peak_rss_bytes()` after it bound what the call itself added.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last reset (Linux KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> int:
    """Reset the high-water mark to the current RSS where the OS allows it; return the baseline to subtract
    (the current RSS after a reset, else the old high-water mark, which can under-count a small call)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak_rss_bytes()
