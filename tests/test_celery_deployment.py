"""The production topology for real: Airflow's metadata DB on a fresh PostgreSQL database,
the CeleryExecutor with Redis as broker, and api-server, scheduler, dag-processor, triggerer
and a Celery worker as separate processes. Two batches dropped into the inbox are ingested
with nobody running a command, then everything stops cleanly.

Needs PostgreSQL (127.0.0.1:5432, trust auth, user postgres) and Redis (127.0.0.1:6379);
``.ci/run`` starts them. In CI a missing service fails the test; elsewhere it is skipped.
"""

import datetime as dt
import itertools
import os
import re
import secrets
import time

import psutil
import psycopg
import pytest
import redis

from pipeline import db, enrollment, intake, ledger, preload, tables
from pipeline.cluster import COMPONENTS, Cluster, cluster_env
from pipeline.embedded import INGEST_POOL, free_port
from pipeline.home import REPO_ROOT, DataHome, data_home
from pipeline.protocol import load_protocol
from pipeline.synth import make_trial
from pipeline.watch import ingest_run_id
from tests.conftest import SMALL

POSTGRES = "postgres@127.0.0.1:5432"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# The test's own Redis database, and a queue per run: tasks of concurrent runs (or of another
# Celery deployment on this Redis) never meet. Celery's shared bookkeeping (the control and
# event channels' bindings) stays behind in this one database only.
REDIS_DB = 13
BOUND = 360  # seconds: every wait below shares this bound
STEPS = 7  # tasks of the ingest DAG


def _require_services() -> None:
    problems = []
    try:
        psycopg.connect(f"postgresql://{POSTGRES}/postgres", connect_timeout=5).close()
    except psycopg.Error as error:
        problems.append(f"PostgreSQL on 127.0.0.1:5432: {error}")
    try:
        redis.Redis(REDIS_HOST, REDIS_PORT, socket_timeout=5).ping()
    except redis.RedisError as error:
        problems.append(f"Redis on 127.0.0.1:6379: {error}")
    if problems:
        message = "; ".join(problems) + " (.ci/run starts both)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _admin(sql: str) -> None:
    with psycopg.connect(f"postgresql://{POSTGRES}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def _expected(planned) -> tuple[int, int]:
    """(archived, quarantined) files of a planned batch."""
    files = [p for p in planned.folder.rglob("*") if p.is_file()]
    return len(files) - len(planned.bad_files), len(planned.bad_files)


def _logs(home: DataHome, lines: int = 60) -> str:
    """The last lines of every component's log (the test data is synthetic)."""
    out = []
    for log in sorted((home.airflow / "process-logs").glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        out.append(f"===== {log.name} =====\n" + "\n".join(tail))
    return "\n".join(out)


def _wait(what, check, cluster, deadline):
    while True:
        cluster.check_alive()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(2)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """Start the deployment, drop two batches into the inbox, wait for their ingest runs,
    stop everything; return what the REST API, the processes and the disk showed."""
    _require_services()
    started = time.monotonic()
    deadline = started + BOUND
    root = tmp_path_factory.mktemp("celery")
    name = f"trialpipe_celery_{secrets.token_hex(5)}"
    ledger_url = f"postgresql+psycopg://{POSTGRES}/{name}_ledger"
    home = DataHome(data_home(root / "home").root, ledger_url).ensure()
    protocol = load_protocol("DEMO-01")
    # One baseline visit per site; the first batch holds a truncated and a non-DICOM file,
    # the second a slice too thick: quarantined files must come out right as well.
    trial = make_trial(
        root / "trial", protocol, subjects_per_site=1, visits=protocol.visit_ids[:1], shape=SMALL
    )
    enrollment.import_csv(home, protocol, trial.enrollment_csv)
    planned = trial.batches[:2]

    queue = f"trialpipe-test-{secrets.token_hex(4)}"  # no other worker takes our tasks
    env = cluster_env(
        home,
        database_url=f"postgresql+psycopg2://{POSTGRES}/{name}",
        broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
        result_backend=f"db+postgresql://{POSTGRES}/{name}",
        api_port=free_port(),
        ledger_url=ledger_url,
    )
    env.update(
        {
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # The test is about intake and ingest: no daily compaction run beside them.
            "TRIALPIPE_COMPACT_SCHEDULE": "",
        }
    )
    try:
        _admin(f'CREATE DATABASE "{name}"')
        _admin(f'CREATE DATABASE "{name}_ledger"')
        yield _run(Cluster(home, env), home, planned, queue, started, deadline)
    finally:
        db.engine(ledger_url).dispose()
        _drop(name, queue)


def _run(cluster, home, planned, queue, started, deadline):
    record = {"home": home, "planned": planned, "queue": queue}
    try:
        # One pool slot, four worker processes: the pool, not the worker, must set the pace.
        cluster.prepare(ingest_slots=1, timeout=deadline - time.monotonic())
        cluster.start(
            worker_args=(
                "--queues",
                queue,
                "--concurrency",
                "4",
                "--without-gossip",
                "--without-mingle",
            )
        )
        record["pids"] = cluster.pids
        record["commands"] = {n: psutil.Process(p).cmdline() for n, p in cluster.pids.items()}
        cluster.wait_until_serving(timeout=deadline - time.monotonic())
        api = cluster.api()
        _wait("the DAGs", lambda: api.get("/dags/trialpipe_intake"), cluster, deadline)
        record["ready_after"] = time.monotonic() - started

        # The uploads land in the inbox; from here on nobody triggers anything.
        batch_ids = [
            intake.stage_batch(
                home, "DEMO-01", p.site_id, p.subject_id, p.visit, [p.folder], uploader="site"
            )
            for p in planned
        ]
        record["batch_ids"] = batch_ids

        def terminal():
            runs = {
                b: api.get(f"/dags/trialpipe_ingest/dagRuns/{ingest_run_id(b)}") for b in batch_ids
            }
            done = all(r and r["state"] in ("success", "failed") for r in runs.values())
            return runs if done else None

        record["runs"] = _wait("both ingest runs", terminal, cluster, deadline)
        record["all_ingest_runs"] = api.get("/dags/trialpipe_ingest/dagRuns")["dag_runs"]
        record["intake_runs"] = api.get("/dags/trialpipe_intake/dagRuns")["dag_runs"]
        record["task_instances"] = {
            b: api.get(f"/dags/trialpipe_ingest/dagRuns/{ingest_run_id(b)}/taskInstances")[
                "task_instances"
            ]
            for b in batch_ids
        }
        record["pool"] = api.get(f"/pools/{INGEST_POOL}")
        record["ingest_dag"] = api.get("/dags/trialpipe_ingest")
        record["processed_after"] = time.monotonic() - started
        record["alive"] = {n: psutil.pid_exists(pid) for n, pid in cluster.pids.items()}
    except BaseException:
        print(_logs(home))
        raise
    finally:
        stopped = cluster.stop(timeout=30)  # each takes seconds when healthy
        record["exit_codes"], record["killed"] = stopped.exit_codes, stopped.killed
        record["total"] = time.monotonic() - started
    unclean = any(code != 0 for code in record["exit_codes"].values()) or record["killed"]
    if unclean or any(r["state"] != "success" for r in record["runs"].values()):
        print(_logs(home))
    return record


def _drop(name: str, queue: str) -> None:
    for database in (name, f"{name}_ledger"):
        _admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    client = redis.Redis(REDIS_HOST, REDIS_PORT, db=REDIS_DB, socket_timeout=5)
    for key in client.scan_iter(match=f"*{queue}*"):
        client.delete(key)


def test_both_uploads_are_ingested_without_anyone_triggering_a_run(deployment):
    runs = deployment["runs"]
    assert {b: r["state"] for b, r in runs.items()} == dict.fromkeys(
        deployment["batch_ids"], "success"
    )
    # One ingest run per batch, named by the batch, with nothing but the batch ID as conf.
    ingest = deployment["all_ingest_runs"]
    assert sorted(r["dag_run_id"] for r in ingest) == sorted(
        ingest_run_id(b) for b in deployment["batch_ids"]
    )
    for run in ingest:
        assert run["conf"] == {"batch_id": run["dag_run_id"].removeprefix("batch__")}
    # Started by the inbox watcher's asset events, through the intake DAG.
    intake_runs = deployment["intake_runs"]
    assert intake_runs and all(r["state"] == "success" for r in intake_runs)
    assert {r["run_type"] for r in intake_runs} == {"asset_triggered"}


def test_every_ingest_task_ran_on_the_celery_worker_in_the_ingest_pool(deployment):
    for tis in deployment["task_instances"].values():
        assert len(tis) == STEPS
        for ti in tis:
            assert ti["state"] == "success", ti["task_id"]
            assert ti["pool"] == INGEST_POOL
            assert ti["queue"] == deployment["queue"]
            assert ti["hostname"]


def test_the_ingest_pool_sets_the_pace_not_the_worker(deployment):
    """One slot: no two ingest tasks ran at once, though the worker could run four."""
    assert deployment["pool"]["slots"] == 1
    # The same setting, as the DAG processor parsed it, limits the active runs.
    assert deployment["ingest_dag"]["max_active_runs"] == 1
    spans = sorted(
        (dt.datetime.fromisoformat(ti["start_date"]), dt.datetime.fromisoformat(ti["end_date"]))
        for tis in deployment["task_instances"].values()
        for ti in tis
    )
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start


def test_archive_tables_and_ledger_hold_exactly_what_was_uploaded(deployment):
    home, planned = deployment["home"], deployment["planned"]
    expected = dict(zip(deployment["batch_ids"], map(_expected, planned), strict=True))
    archived = sum(a for a, _ in expected.values())
    assert len(list(home.archive.rglob("*.dcm"))) == archived
    assert tables.read_table(home, "instances").num_rows == archived
    assert tables.read_table(home, "series").num_rows == 2 * len(planned)  # a CT and an MR each
    batches = {r["batch_id"]: r for r in tables.read_table(home, "batches").to_pylist()}
    assert sorted(batches) == sorted(expected)
    # The ledger is on PostgreSQL ($TRIALPIPE_LEDGER_URL), written by the Celery worker.
    assert home.ledger_url.startswith("postgresql")
    for row in ledger.batch_summaries(home):
        assert row["state"] == "done"
        assert (row["archived"], row["quarantined"]) == expected[row["batch_id"]]
        assert {f["dag_run_id"] for f in ledger.file_rows(home, row["batch_id"])} == {
            ingest_run_id(row["batch_id"])
        }
    assert not list(home.claimed.iterdir())  # nothing left half-done


def test_every_component_ran_as_its_own_process_and_stopped_cleanly(deployment):
    pids = deployment["pids"]
    assert sorted(pids) == sorted(COMPONENTS)
    assert len(set(pids.values())) == len(pids)
    assert all(deployment["alive"].values()), deployment["alive"]
    # The worker, whose pool and task processes are forked from it, has the pipeline loaded.
    assert deployment["commands"]["celery-worker"][:5] == [*preload.command(), "celery", "worker"]
    # Each one exited by itself on SIGTERM, with success, and took its processes with it:
    # stopping had to kill nothing (it would have, and said so).
    assert deployment["exit_codes"] == dict.fromkeys(COMPONENTS, 0)
    assert deployment["killed"] == {}


def test_the_deployment_fits_its_time_bound(deployment):
    print(
        f"serving after {deployment['ready_after']:.0f}s, both batches ingested after "
        f"{deployment['processed_after']:.0f}s, stopped after {deployment['total']:.0f}s; "
        f"exit codes {deployment['exit_codes']}"
    )
    assert deployment["total"] < BOUND


def test_the_readme_says_how_to_run_this_deployment_by_hand(home):
    """Every variable the deployment sets, and every component, is in the README's section."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Production mode by hand", 1)[1].split("\n## ", 1)[0]
    env = cluster_env(home, database_url="", broker_url="", result_backend="", ledger_url="x")
    env.pop("AIRFLOW__API_AUTH__JWT_SECRET")  # generated per deployment, named below
    for variable in [*env, "AIRFLOW__API_AUTH__JWT_SECRET"]:
        assert re.search(rf"\b{variable}=", section), variable
    for args in COMPONENTS.values():
        assert f"airflow {' '.join(args[:2] if args[0] == 'celery' else args[:1])}" in section
    assert f"airflow pools set {INGEST_POOL}" in section
