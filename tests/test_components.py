"""Stopping the Airflow components started as child processes (pipeline.embedded.Components):
a component that does not exit on SIGTERM, or leaves a process behind, is killed and named,
so a clean stop can be told from one that had to kill; nothing survives either way."""

import os
import sys
import time

import psutil

from pipeline.embedded import Components

# Stand-ins for Airflow components, run by this Python instead of `airflow`.
CLEAN = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
time.sleep(60)
"""
LEAVES_A_CHILD = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # exits, forgetting its child
print("ready", flush=True)
time.sleep(60)
"""
IGNORES_SIGTERM = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def _started(home, programs):
    components = Components(home, {}, program=sys.executable)
    for name, code in programs.items():
        components.start(name, ["-c", code])
    deadline = time.monotonic() + 20
    for name in programs:
        log = components.logs / f"{name}.log"
        while "ready" not in log.read_text():
            assert time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.05)
    return components


def _alive_in_sessions(leaders):
    """Live processes whose session one of ``leaders`` leads, after SIGKILL has landed."""
    deadline = time.monotonic() + 5
    while True:
        alive = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) in leaders and (process.status() != psutil.STATUS_ZOMBIE):
                    alive.append(process.pid)
            except (psutil.Error, OSError):
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_a_clean_stop_kills_nothing(home):
    components = _started(home, {"scheduler": CLEAN, "api-server": CLEAN})
    stopped = components.stop(timeout=10, grace=0.5)
    assert stopped.exit_codes == {"scheduler": 0, "api-server": 0}
    assert stopped.killed == {}


def test_stop_names_what_did_not_exit_with_its_component_and_kills_it(home):
    components = _started(
        home, {"scheduler": CLEAN, "triggerer": LEAVES_A_CHILD, "celery-worker": IGNORES_SIGTERM}
    )
    pids = {process.pid for process in components.procs.values()}
    stopped = components.stop(timeout=1, grace=0.5)
    # The one that ignored SIGTERM was killed; the one that exited left its child behind.
    assert stopped.exit_codes == {"scheduler": 0, "triggerer": 0, "celery-worker": -9}
    assert sorted(stopped.killed) == ["celery-worker", "triggerer"]
    assert stopped.killed["celery-worker"] == [
        f"celery-worker (pid {components.procs['celery-worker'].pid})"
    ]
    (leftover,) = stopped.killed["triggerer"]
    assert leftover.startswith("python")
    # And nothing of theirs runs any more: the embedded mode relies on that.
    assert _alive_in_sessions(pids) == []
