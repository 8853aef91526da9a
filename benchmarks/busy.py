"""A busy machine for the benchmarks' ``--busy N``: N competing CPU-bound processes, bounded, always stopped.

Shared CPUs (CI runners, shared servers, laptops doing other work) are where fps runs when it runs on a CPU
(DESIGN.md section 6), so the CPU benchmarks report their ratios with the machine idle and busy side by side.

Each competitor is a Python process spinning in a loop; it stops by itself after ``limit`` seconds (so that a
benchmark killed with SIGKILL leaves nothing running for long), and the context manager terminates it on exit,
on an exception, on Ctrl-C or on SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
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

    def stop(signum, frame):  # SIGTERM (timeout, kill): leave through the finally below, which stops them
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if n else None
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
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def load_average() -> float:
    """The 1-minute load average (what `uptime` shows first)."""
    return os.getloadavg()[0]


def child_argv(argv: list[str]) -> list[str]:
    """A benchmark's own arguments less ``--json`` and ``--busy N``, for the child processes it starts (a child
    measures one variant under whatever load its parent set up, and answers in JSON anyway)."""
    kept = []
    for i, arg in enumerate(argv):
        if arg == "--json" or arg.startswith("--busy") or (i > 0 and argv[i - 1] == "--busy"):
            continue
        kept.append(arg)
    return kept
