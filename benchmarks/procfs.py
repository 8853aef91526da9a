"""Process memory from Linux's procfs, for the CPU benchmarks: a ``/proc/self/status`` field, and resetting the peak.

Both answer ``None`` / ``False`` where there is no procfs (macOS, Windows), so a benchmark still runs there.
"""

from __future__ import annotations

from pathlib import Path


def status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmRSS``: now, ``VmHWM``: the peak) in MiB; ``None`` without procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the peak resident size (``VmHWM``) to the current one (Linux >= 4.0); ``False`` where that cannot be."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
