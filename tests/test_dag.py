"""The DAG file imports cleanly in Airflow, parses fast, and wires the tasks in flow order."""

import itertools
import subprocess
import sys
import time

import pytest

from pipeline.embedded import INGEST_POOL
from pipeline.home import dags_dir
from pipeline.watch import ReadyBatchTrigger

FLOW = ["claim", "deidentify", "verify", "validate", "write_tables", "route", "finalize"]


def _dagbag(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(dags_dir()))


def test_the_dag_folder_imports_without_errors(tmp_path, monkeypatch):
    bag = _dagbag(tmp_path, monkeypatch)
    assert bag.import_errors == {}
    assert sorted(bag.dags) == ["trialpipe_compact", "trialpipe_ingest", "trialpipe_intake"]


def test_tasks_are_named_for_the_flow_and_run_in_order(tmp_path, monkeypatch):
    dag = _dagbag(tmp_path, monkeypatch).dags["trialpipe_ingest"]
    assert [t.task_id for t in dag.topological_sort()] == FLOW
    for upstream, downstream in itertools.pairwise(FLOW):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert dag.schedule is None or dag.timetable.summary in ("None", None)
    assert all(t.retries >= 1 for t in dag.tasks)


def test_every_ingest_task_runs_in_the_ingest_pool_later_steps_first(tmp_path, monkeypatch):
    dag = _dagbag(tmp_path, monkeypatch).dags["trialpipe_ingest"]
    assert {t.pool for t in dag.tasks} == {INGEST_POOL}
    # A free slot goes to a started batch's next step before a new batch's claim.
    assert {str(t.weight_rule) for t in dag.tasks} == {"upstream"}


def test_a_burst_of_uploads_runs_as_many_batches_at_once_as_the_ingest_setting_says(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("TRIALPIPE_INGEST_SLOTS", raising=False)
    assert _dagbag(tmp_path, monkeypatch).dags["trialpipe_ingest"].max_active_runs == 4
    monkeypatch.setenv("TRIALPIPE_INGEST_SLOTS", "2")
    assert _dagbag(tmp_path, monkeypatch).dags["trialpipe_ingest"].max_active_runs == 2


def test_an_ingest_setting_that_is_no_number_is_named_where_airflow_shows_import_errors(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TRIALPIPE_INGEST_SLOTS", "four")
    bag = _dagbag(tmp_path, monkeypatch)
    assert "trialpipe_ingest" not in bag.dags
    (error,) = [e for f, e in bag.import_errors.items() if f.endswith("trialpipe_ingest.py")]
    assert "TRIALPIPE_INGEST_SLOTS must be a whole number of at least 1, not 'four'" in error


def test_the_intake_dag_runs_on_the_inbox_watchers_events(tmp_path, monkeypatch):
    dag = _dagbag(tmp_path, monkeypatch).dags["trialpipe_intake"]
    (inbox,) = dag.timetable.asset_condition.objects
    (watcher,) = inbox.watchers
    assert isinstance(watcher.trigger, ReadyBatchTrigger)
    assert dag.max_active_runs == 1
    trigger = dag.get_task("trigger_ingest")
    assert trigger.upstream_task_ids == {"announced_batches"}
    assert trigger.partial_kwargs["trigger_dag_id"] == "trialpipe_ingest"
    assert trigger.partial_kwargs["skip_when_already_exists"] is True
    assert trigger.partial_kwargs["openlineage_inject_parent_info"] is False
    assert trigger.pool != INGEST_POOL  # triggering must not wait behind the batches


def test_compaction_runs_daily_in_a_deployment_and_on_demand_when_embedded(tmp_path, monkeypatch):
    dag = _dagbag(tmp_path, monkeypatch).dags["trialpipe_compact"]
    assert dag.schedule == "@daily" and dag.max_active_runs == 1
    monkeypatch.setenv("TRIALPIPE_COMPACT_SCHEDULE", "")
    dag = _dagbag(tmp_path, monkeypatch).dags["trialpipe_compact"]
    assert dag.schedule is None


@pytest.mark.parametrize(
    "dag_file", ["trialpipe_ingest.py", "trialpipe_compact.py", "trialpipe_intake.py"]
)
def test_parsing_a_dag_file_does_not_import_the_pipeline(tmp_path, dag_file):
    """Heavy imports (pydicom, deid, Great Expectations) belong inside the tasks. The
    pipeline modules a DAG file may import are the inbox watcher's trigger (stdlib and
    Airflow only: an asset watcher needs the trigger instance at parse time) and the
    settings (stdlib only)."""
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = [m for m in sys.modules if m in ('pydicom', 'deid', 'great_expectations',"
        " 'pandas', 'pyarrow', 'duckdb') or (m.startswith('pipeline.')"
        " and m not in ('pipeline.watch', 'pipeline.settings'))]; print(','.join(sorted(heavy)))"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", code, str(dags_dir() / dag_file)],
        capture_output=True,
        text=True,
        env={"AIRFLOW_HOME": str(tmp_path), "PATH": ""},
        check=True,
    )
    assert result.stdout.strip() == ""
    assert time.monotonic() - started < 30
