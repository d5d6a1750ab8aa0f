"""Intake DAG: one ingest run per batch that becomes READY, with nobody running a command.

The inbox is an Airflow asset watched by ``pipeline.watch.ReadyBatchTrigger`` in the
triggerer (no worker slot is held while it waits). Each event names the batches that
became READY; this DAG triggers one ``trialpipe_ingest`` run per batch, conf
``{"batch_id": ...}`` and run ID ``batch__<batch id>``, and skips a batch whose run already
exists. The ingest run claims the batch when a slot of its pool is free.

Wiring only: the request list comes from ``pipeline.watch.ingest_requests``. Only the
trigger's light module is imported at parse time (the asset watcher needs the instance).
Nothing but batch IDs and run IDs passes through XCom.

Needs a triggerer: the embedded ``trialpipe run`` starts none and triggers runs itself.
"""

from __future__ import annotations

import datetime as dt

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, AssetWatcher, dag, get_current_context, task

from pipeline.watch import ReadyBatchTrigger

INBOX = Asset(
    name="trialpipe_inbox",
    watchers=[AssetWatcher(name="trialpipe_ready_batches", trigger=ReadyBatchTrigger())],
)


@task(task_id="announced_batches")
def announced_batches() -> list[dict]:
    from pipeline.watch import ingest_requests

    events = get_current_context()["triggering_asset_events"]
    return ingest_requests(event.extra for event in events[INBOX])


@dag(
    dag_id="trialpipe_intake",
    description="Trigger one ingest run per batch that became READY in the inbox",
    schedule=[INBOX],
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=False,
    # One at a time: events arriving meanwhile are gathered into the next run.
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=5)},
    tags=["trialpipe"],
)
def trialpipe_intake() -> None:
    TriggerDagRunOperator.partial(
        task_id="trigger_ingest",
        trigger_dag_id="trialpipe_ingest",
        logical_date=None,  # the ingest DAG has no schedule: a run is named by its batch
        skip_when_already_exists=True,  # announced twice, run once
        openlineage_inject_parent_info=False,  # the conf holds the batch ID and nothing else
    ).expand_kwargs(announced_batches())


trialpipe_intake()
