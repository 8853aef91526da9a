"""A busy machine for the benchmarks' ``--busy N``: N competing CPU-bound processes, bounded, always stopped.

Shared CPUs (CI runners, shared servers, laptops doing other work) are where fps runs when it runs on a CPU
(DESIGN.md section 6), so the CPU benchmarks report their ratios with the machine idle and busy side by side.

Each competitor is a Python process spinning in a loop; it stops by itself after ``limit`` seconds (so that a
benchmark killed with SIGKILL leaves nothing running for long), and the context manager terminates it on exit,
on an exception or on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

SPIN = (
    "import time\n"
    "end = time.monotonic() + {limit}\n"
    "x = 0\n"
    "while time.monotonic() < end:\n"
    "    x = (x * 31 + 7) % 1000003\n"
)


@contextlib.contextmanager
def busy(n: int, limit: float = 900.0) -> Iterator[list[subprocess.Popen]]:
    """Run ``n`` CPU-bound processes for the duration of the block (at most ``limit`` seconds each)."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", SPIN.format(limit=limit)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        if procs:
            time.sleep(0.5)  # let them start spinning before anything is timed
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def load_average() -> float:
    """The 1-minute load average (what `uptime` shows first)."""
    return os.getloadavg()[0]
