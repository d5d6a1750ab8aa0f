"""The embedded Airflow: SQLite metadata DB and LocalExecutor inside the data home.

``trialpipe run`` migrates the metadata DB, starts an api-server (Airflow 3 task processes
report through its Execution API) and a scheduler with the LocalExecutor as child processes,
serializes the DAGs, triggers one run of the ingest DAG per READY batch (run conf: the batch
ID only), waits until every run is terminal and stops what it started. Children get SIGTERM
if this process dies, and a later run reaps any that survived (by session).

Crash recovery: one `trialpipe run` per data home at a time (a lock; a second one waits).
At start, runs a killed predecessor left unfinished are marked failed and their batches,
still claimed, get new runs; every task is idempotent and skips work it completed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import atomic
from pipeline.home import DataHome, dags_dir
from pipeline.preload import command as preload_command
from pipeline.settings import ingest_slots

if TYPE_CHECKING:
    import psutil

DAG_ID = "trialpipe_ingest"
COMPACT_DAG_ID = "trialpipe_compact"
# Every task of the ingest DAG runs in this pool (dags/trialpipe_ingest.py): its slots bound
# how many batches are processed at once. A deployment creates it (`airflow pools set`).
INGEST_POOL = "trialpipe_ingest"
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)


class EmbeddedAirflowError(RuntimeError):
    """Airflow started by trialpipe (embedded, or a ``pipeline.cluster`` deployment) could not
    start or did not finish in time."""


# This environment's `airflow` command: every component runs with this interpreter's packages.
AIRFLOW = str(Path(sys.executable).parent / "airflow")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def jwt_secret(home: DataHome) -> str:
    """The secret Airflow's components sign their JWTs with, made once per data home."""
    path = home.restricted / "secrets" / "airflow-jwt"
    return atomic.create_secret(path, secrets.token_urlsafe(64)).strip()


def airflow_env(home: DataHome, port: int) -> dict[str, str]:
    """Airflow configuration for the embedded default, as environment variables."""
    home.ensure()
    return {
        "TRIALPIPE_HOME": str(home.root),
        "AIRFLOW_HOME": str(home.airflow),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_dir()),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home.airflow / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # As many task slots as batches may be processed at once: the pool's size.
        "AIRFLOW__CORE__PARALLELISM": str(ingest_slots()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret(home),
        "AIRFLOW__API_AUTH__JWT_ISSUER": "trialpipe-embedded",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        # Shorter idle waits: one batch is a short chain of tasks, not a nightly job.
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        # Airflow runs here only while a command does: compaction runs by `trialpipe compact`.
        "TRIALPIPE_COMPACT_SCHEDULE": "",
    }


def _die_with_parent() -> None:  # runs in the child before exec
    os.setsid()
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _session_processes(sessions: dict[int, float]) -> dict[int, list[psutil.Process]]:
    """The live processes of the given sessions (leader PID -> leader's start time), by
    leader. Each component leads its own session (setsid), so every process it started,
    task processes included, even orphaned ones, carries the component's PID as its session
    ID; the start time tells a reused PID apart."""
    import psutil

    found: dict[int, list[psutil.Process]] = {}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            leader = os.getsid(process.pid)
            if (
                leader in sessions
                and process.create_time() >= sessions[leader] - 0.01
                and process.status() != psutil.STATUS_ZOMBIE  # already gone, not yet reaped
            ):
                found.setdefault(leader, []).append(process)
    return found


def _kill_sessions(sessions: dict[int, float]) -> dict[int, list[str]]:
    """Kill every live process of the given sessions; return what was killed, by session
    leader, as ``"<process name> (pid N)"`` (a name, never a command line)."""
    import psutil

    killed: dict[int, list[str]] = {}
    for leader, processes in _session_processes(sessions).items():
        for process in processes:
            with contextlib.suppress(psutil.Error):
                described = f"{process.name()} (pid {process.pid})"
                process.kill()
                killed.setdefault(leader, []).append(described)
    return killed


# The scheduler first, so nothing new is queued; the api-server last: running task processes
# (a Celery worker's too, which finishes them on SIGTERM) still need it.
STOP_ORDER = ("scheduler", "triggerer", "dag-processor", "celery-worker", "api-server")


@dataclass(frozen=True)
class Stopped:
    """How :meth:`Components.stop` went.

    ``exit_codes``: each component's exit code (negative: the signal that ended it).
    ``killed``: per component, the processes of its session that had to be killed: the
    component itself if it ignored SIGTERM, and whatever outlived it. A clean stop kills
    nothing.
    """

    exit_codes: dict[str, int]
    killed: dict[str, list[str]]


class Components:
    """Airflow components as child processes, stopped (with their task processes) on exit.

    Used by the embedded mode and by the multi-process deployment (``pipeline.cluster``).
    ``program`` is what each component runs with its arguments (default: this environment's
    ``airflow``).
    """

    def __init__(self, home: DataHome, env: dict[str, str], program: str | None = None) -> None:
        self.program = program or AIRFLOW
        self.env = {**os.environ, **env}
        self.logs = home.airflow / "process-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pidfile = home.airflow / "trialpipe-run.pids"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._reap_stale()

    def _reap_stale(self) -> None:

        if not self.pidfile.exists():
            return
        sessions = {}
        for line in self.pidfile.read_text().split():
            pid, created = line.split(":")
            sessions[int(pid)] = float(created)
        _kill_sessions(sessions)
        self.pidfile.unlink()

    def start(self, name: str, args: list[str], preload: bool = False) -> None:
        """Start component ``name`` (``airflow ARGS``); with ``preload``, with the tasks'
        modules already imported (:mod:`pipeline.preload`), for a component whose task
        processes are forked from it."""
        import psutil

        command = preload_command() if preload else [self.program]
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                [*command, *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        self.procs[name] = process
        with self.pidfile.open("a") as handle:
            handle.write(f"{process.pid}:{psutil.Process(process.pid).create_time()}\n")

    def check_alive(self) -> None:
        for name, process in self.procs.items():
            if process.poll() is not None:
                raise EmbeddedAirflowError(
                    f"Airflow {name} stopped (exit {process.returncode}); "
                    f"see {self.logs / (name + '.log')}"
                )

    def stop(self, timeout: float = 30.0, grace: float = 5.0) -> Stopped:
        """SIGTERM each component and wait up to ``timeout`` for it to exit (killing it
        then); give what is left of their sessions ``grace`` seconds to exit, kill the rest.
        Nothing survives; the result says what had to be killed."""
        import psutil

        sessions = {}
        for process in self.procs.values():
            with contextlib.suppress(psutil.Error):
                sessions[process.pid] = psutil.Process(process.pid).create_time()
        killed: dict[str, list[str]] = {}
        order = [n for n in STOP_ORDER if n in self.procs]
        order += [n for n in self.procs if n not in STOP_ORDER]
        for name in order:
            process = self.procs[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    killed[name] = [f"{name} (pid {process.pid})"]
        # A process still running once its component has exited did not stop with it; one
        # already on its way out gets a moment to finish.
        leftovers = [p for found in _session_processes(sessions).values() for p in found]
        psutil.wait_procs(leftovers, timeout=grace)
        component = {process.pid: name for name, process in self.procs.items()}
        for leader, processes in _kill_sessions(sessions).items():
            killed.setdefault(component[leader], []).extend(processes)
        self.pidfile.unlink(missing_ok=True)
        return Stopped({name: process.wait() for name, process in self.procs.items()}, killed)


def _configure(home: DataHome, port: int) -> dict[str, str]:
    """Point this process's Airflow at the data home; return the children's environment."""
    env = airflow_env(home, port)
    # This process only migrates, triggers and polls: its own Airflow logging stays quiet;
    # the components (and the task logs) keep Airflow's INFO level.
    os.environ.update({**env, "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR"})
    return {**env, "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}


def _migrate() -> None:
    from airflow.utils.db import upgradedb

    upgradedb()


def _size_ingest_pool(slots: int) -> None:
    """Give the ingest pool ``slots`` slots, creating it if missing: Airflow never schedules
    a task of a pool that does not exist. In the embedded mode ``$TRIALPIPE_INGEST_SLOTS``
    is the only knob, so each run sets the pool to it (a deployment sizes its own pool)."""
    from airflow.models.pool import Pool

    Pool.create_or_update_pool(
        INGEST_POOL, slots, "Batches processed at once", include_deferred=False
    )


def _serialize_dags() -> None:
    import argparse

    from airflow.cli.commands.dag_command import dag_reserialize

    dag_reserialize(argparse.Namespace(bundle_name=None))


def _wait_for(check, stack: Components, deadline: float, what: str) -> None:  # type: ignore[no-untyped-def]
    while True:
        stack.check_alive()
        if check():
            return
        if time.monotonic() > deadline:
            raise EmbeddedAirflowError(f"timed out waiting for {what}")
        time.sleep(0.25)


def run_ready_batches(home: DataHome, timeout: float = 3600) -> dict[str, str]:
    """Trigger one ingest DAG run per READY batch; wait until all are terminal.

    Returns ``{batch_id: dag_run_state}``. Quarantined files or batches are a normal,
    successful outcome of a run; only an infrastructure failure fails it.
    """
    from pipeline.intake import ready_batches, unfinished_batches

    with _exclusive(home):
        # Claimed but never finalized: a run cut off (kill -9, power loss) is resumed first.
        found = [*unfinished_batches(home), *ready_batches(home)]
        batches = list(dict.fromkeys(batch.batch_id for batch in found))
        if not batches:
            return {}
        wanted = [(DAG_ID, run_id_for(b), {"batch_id": b}) for b in batches]
        states = run_dags(home, wanted, timeout)
    return {
        batch_id: states[run_id] for (_, run_id, _), batch_id in zip(wanted, batches, strict=True)
    }


def run_compaction(home: DataHome, timeout: float = 3600) -> str:
    """Run the table compaction DAG once; return the DAG run's final state."""
    run_id = f"compact__{time.strftime('%Y%m%dT%H%M%S')}"
    with _exclusive(home):
        return run_dags(home, [(COMPACT_DAG_ID, run_id, {})], timeout)[run_id]


@contextlib.contextmanager
def _exclusive(home: DataHome):  # type: ignore[no-untyped-def]
    """One embedded Airflow per data home: a second `trialpipe run` waits for the first,
    then finds the batches already processed."""
    import fcntl

    home.ensure()
    with open(home.airflow / "trialpipe-run.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("trialpipe: another run is using this data home; waiting", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_dags(
    home: DataHome, wanted: list[tuple[str, str, dict[str, str]]], timeout: float
) -> dict[str, str]:
    """Start Airflow, trigger each ``(dag_id, run_id, conf)``, wait until every run is
    terminal, stop Airflow; return ``{run_id: state}``."""
    port = free_port()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = _configure(home, port)
    _migrate()
    _size_ingest_pool(ingest_slots())
    stack = Components(home, env)  # reaps what a killed earlier run left behind
    _close_abandoned_runs()
    try:
        stack.start(
            "api-server",
            [
                "api-server",
                "--apps",
                "execution",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
        )
        stack.start("scheduler", ["scheduler", "--skip-serve-logs"], preload=True)
        _serialize_dags()
        deadline = time.monotonic() + 180
        dag_ids = sorted({dag_id for dag_id, _, _ in wanted})
        _wait_for(lambda: _dags_ready(dag_ids), stack, deadline, "the DAGs to be parsed")
        _wait_for(lambda: _healthy(port), stack, deadline, "the Execution API")
        for dag_id, run_id, conf in wanted:
            _trigger(dag_id, run_id, conf)
        states: dict[str, str] = {}

        def all_terminal() -> bool:
            states.update(_run_states([run_id for _, run_id, _ in wanted]))
            return len(states) == len(wanted) and all(
                s in ("success", "failed") for s in states.values()
            )

        _wait_for(all_terminal, stack, time.monotonic() + timeout, "the DAG runs")
    finally:
        stopped = stack.stop()
        signal.signal(signal.SIGTERM, previous)
        for processes in stopped.killed.values():
            # Process names only (Stopped holds no command lines): said, not hidden.
            print(f"trialpipe: had to kill {', '.join(processes)}", file=sys.stderr)
    return states


def _close_abandoned_runs() -> None:
    """Mark runs left unfinished by a killed earlier `trialpipe run` as failed, before the
    scheduler starts: in the embedded mode nothing else can be running them, and their
    batches are resumed by new runs (every task is idempotent)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    with create_session() as session:
        stale = [DagRunState.QUEUED, DagRunState.RUNNING]
        for run in session.query(DagRun).filter(DagRun.state.in_(stale)).all():
            run.state = DagRunState.FAILED
        for ti in session.query(TaskInstance).filter(
            TaskInstance.state.in_(
                [
                    TaskInstanceState.RUNNING,
                    TaskInstanceState.QUEUED,
                    TaskInstanceState.SCHEDULED,
                    TaskInstanceState.UP_FOR_RETRY,
                    TaskInstanceState.RESTARTING,
                    TaskInstanceState.DEFERRED,
                ]
            )
        ):
            ti.state = TaskInstanceState.FAILED


def _dags_ready(dag_ids: list[str]) -> bool:
    from airflow.models.dag import DagModel
    from airflow.models.serialized_dag import SerializedDagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        for dag_id in dag_ids:
            if not SerializedDagModel.has_dag(dag_id, session=session):
                return False
            model = DagModel.get_dagmodel(dag_id, session=session)
            if model is not None and model.is_paused:
                model.is_paused = False
    return True


def _healthy(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/execution/health", timeout=15).close()
    except OSError:
        return False
    return True


def run_id_for(batch_id: str) -> str:
    """The DAG run ID of a batch: readable in the UI, unique per attempt."""
    return f"batch__{batch_id}__{time.strftime('%Y%m%dT%H%M%S')}"


def _trigger(dag_id: str, run_id: str, conf: dict[str, str]) -> None:
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.utils.types import DagRunTriggeredByType

    trigger_dag(dag_id, run_id=run_id, conf=conf, triggered_by=DagRunTriggeredByType.CLI)


def _run_states(run_ids: list[str]) -> dict[str, str]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(DagRun.run_id, DagRun.state).filter(DagRun.run_id.in_(run_ids)).all()
    return {run_id: str(getattr(state, "value", state)) for run_id, state in rows}


def serve_ui(home: DataHome, port: int = 8080) -> int:
    """Serve Airflow's UI and REST API for this data home until interrupted."""
    env = _configure(home, port)
    _migrate()
    print(f"Airflow UI: http://127.0.0.1:{port}/  (Ctrl-C to stop)")
    return subprocess.call(
        [AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env},
    )
