"""Fault injection for the crash tests: a named point where a process can be made to wait
so a test can kill it there (kill -9) and prove that a rerun accounts for every file.

Inert unless ``$TRIALPIPE_FAULTS`` names a folder holding a file named after the point. A
trigger fires once: it is removed when hit, so the retry after the kill runs through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "TRIALPIPE_FAULTS"


def checkpoint(name: str) -> None:
    """Wait here (up to 10 minutes) if the test armed ``name``; writes this PID first."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    trigger = Path(folder) / name
    try:
        trigger.unlink()
    except FileNotFoundError:
        return
    (Path(folder) / f"{name}.pid").write_text(str(os.getpid()))
    time.sleep(600)
