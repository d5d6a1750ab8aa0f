"""``python -m pipeline.preload COMPONENT ARGS...``: run an Airflow component with the
modules trialpipe's tasks import already loaded. The embedded mode's scheduler runs this
way, and so do the Celery deployment's workers (``python -m pipeline.preload celery
worker``: in ``pipeline.cluster``, docker/compose.yaml and docker/helm-values.yaml).

Airflow forks each task process from the component (the LocalExecutor's workers from the
scheduler, a Celery worker's pool processes from it; the supervisor's task runner from
those), so a task starts with pydicom, deid, Great Expectations and pyarrow in memory
instead of importing them: about half a second for every task, two for validate's. The
modules are imported before Airflow starts, so nothing is forked half-imported; DAG files
still import nothing of the pipeline (they are parsed by the dag-processor, which this does
not wrap).
"""

from __future__ import annotations

import sys


def command() -> list[str]:
    """How to run this module with this environment's interpreter (then Airflow's
    arguments)."""
    return [sys.executable, "-m", "pipeline.preload"]


def preload() -> None:
    """Import what the ingest tasks import, as they import it."""
    from pipeline import batch, deidentify, quarantine, tables, validate  # noqa: F401

    validate.load()


def main() -> None:
    """Preload, then run ``airflow`` with this command's arguments."""
    preload()
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", *sys.argv[1:]]
    airflow_main()


if __name__ == "__main__":
    main()
