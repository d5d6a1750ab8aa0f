"""Fault injection for the crash tests: a named point where a process can be made to wait
so a test can kill it there (kill -9) and prove that a rerun accounts for every file, or
let it go on once something else has happened meanwhile (another batch overtaking it).

Inert unless ``$TRIALPIPE_FAULTS`` names a folder holding a file named after the point. A
trigger fires once: it is removed when hit, so the retry after the kill runs through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "TRIALPIPE_FAULTS"
_PAUSE = 600.0


def checkpoint(name: str) -> None:
    """Wait here if the test armed ``name``: write this PID to ``<name>.pid``, then wait
    (up to 10 minutes) to be killed, or for a file ``<name>.go`` to go on."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    trigger = Path(folder) / name
    try:
        trigger.unlink()
    except FileNotFoundError:
        return
    (Path(folder) / f"{name}.pid").write_text(str(os.getpid()))
    deadline = time.monotonic() + _PAUSE
    while not (Path(folder) / f"{name}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
