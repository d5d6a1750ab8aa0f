"""Ingest DAG: one run per uploaded batch (run conf: ``{"batch_id": ...}``).

claim -> deidentify -> verify -> validate -> write_tables -> route -> finalize

Wiring only: every task calls the function of the same name in ``pipeline.batch`` with the
batch ID (and the DAG run ID, for the audit ledger) and returns the path that function
wrote. Imports of the pipeline happen inside the
tasks so the DAG file parses fast. Nothing but batch IDs and paths passes through XCom.

A burst of uploads queues instead of taking the cluster, bounded twice by the deployment's
``TRIALPIPE_INGEST_SLOTS`` (default 4; ``pipeline.settings.ingest_slots``). Runs: at most
that many are active (claimed, not yet finalized, read when this file is parsed); the rest
wait queued, their batches still READY in the upload area. Tasks: every task runs in the
``trialpipe_ingest`` pool (``pipeline.embedded.INGEST_POOL``), which the deployment creates
with that many slots and may resize at run time, so at most that many ingest tasks occupy
worker slots at once.
Later steps outrank earlier ones for a free slot (``weight_rule="upstream"``).
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.sdk import chain, dag, get_current_context, task

from pipeline.settings import ingest_slots

STEPS = ("claim", "deidentify", "verify", "validate", "write_tables", "route", "finalize")


def _run_step(step: str) -> str:
    from pipeline.batch import run_task

    run = get_current_context()["dag_run"]
    return run_task(step, str((run.conf or {})["batch_id"]), run_id=run.run_id)


@dag(
    dag_id="trialpipe_ingest",
    description="De-identify, verify, validate, tabulate and route one site batch",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=False,
    max_active_runs=ingest_slots(),
    default_args={
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=5),
        "pool": "trialpipe_ingest",
        "weight_rule": "upstream",
    },
    tags=["trialpipe"],
)
def trialpipe_ingest() -> None:
    tasks = [task(task_id=step)(_run_step)(step) for step in STEPS]
    chain(*tasks)


trialpipe_ingest()
