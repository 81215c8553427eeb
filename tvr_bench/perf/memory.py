"""Peak resident memory of a benchmark call, measured from a reset high-water mark.

A peak-RSS figure is a high-water mark since the process started: transient allocations made while
importing or building inputs can stay above everything a small scorer allocates later, which then shows
no extra memory at all. On Linux, writing 5 to /proc/self/clear_refs resets the mark to the current RSS, so
`reset_peak_rss()` right before a call and `peak_rss_bytes()` after it bound what the call itself added.
Freed heap memory stays resident and is reused without raising the RSS, so the reset first hands free
heap pages back to the OS (glibc `malloc_trim`): the call's allocations then show up as new pages.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last reset.

    Linux: `VmHWM` of /proc/self/status. Not `ru_maxrss`: that one is also floored by the peak of the
    image the process was exec'ed from, so a child started by `spawn` (fork + exec) reports at least the
    parent's RSS at fork time and a small scorer shows no growth at all. Elsewhere: `ru_maxrss`.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def release_free_heap() -> None:
    """Return free heap pages to the OS (glibc `malloc_trim(0)`; a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> int:
    """Release free heap pages, reset the high-water mark to the current RSS where the OS allows it and
    return the baseline to subtract (else the old high-water mark, which can under-count a small call)."""
    import gc

    gc.collect()
    release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return peak_rss_bytes()


def timed_calls(fn: Callable[[], T], repeats: int) -> tuple[T, list[float], int, int]:
    """Call `fn` once to warm up, then `repeats` timed times, without gradients, after `reset_peak_rss`:
    the last result, the timed seconds, and the RSS baseline and peak around the calls."""
    import time

    import torch

    base = reset_peak_rss()  # high-water mark reset: import/input peaks do not hide the call's own
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            start = time.perf_counter()
            result = fn()
            if i:
                times.append(time.perf_counter() - start)
    return result, times, base, peak_rss_bytes()
