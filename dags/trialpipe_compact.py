"""Compaction DAG: merge each table partition's per-batch Parquet files into one file.

Wiring only: the task calls ``pipeline.compaction.compact_all`` on the data home, which
holds each table's lock while it merges, so it may run beside ingest runs. Query results
do not change. Scheduled daily in a deployment (``TRIALPIPE_COMPACT_SCHEDULE``, a cron
expression or preset; empty: triggered only); the embedded mode runs it by
``trialpipe compact``.
"""

from __future__ import annotations

import datetime as dt
import os

import pendulum
from airflow.sdk import dag, task


@task(task_id="compact_tables")
def compact_tables() -> list[str]:
    from pipeline.compaction import compact_all
    from pipeline.home import data_home

    return [f"{c.table}/{c.partition}: {c.files_merged} files" for c in compact_all(data_home())]


@dag(
    dag_id="trialpipe_compact",
    description="Merge small per-batch Parquet files; query results stay the same",
    schedule=os.environ.get("TRIALPIPE_COMPACT_SCHEDULE", "@daily") or None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    is_paused_upon_creation=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(seconds=5)},
    tags=["trialpipe"],
)
def trialpipe_compact() -> None:
    compact_tables()


trialpipe_compact()
