"""The embedded scheduler runs through pipeline.preload: Airflow's own CLI, with the
modules the ingest tasks import already loaded (its task processes are forked from it)."""

import subprocess
import sys
from importlib.metadata import version

from pipeline.preload import command


def test_preload_hands_every_argument_to_airflows_cli():
    out = subprocess.run(
        [*command(), "version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip().splitlines()[-1] == version("apache-airflow")


def test_preload_loads_what_the_tasks_import_and_no_pipeline_state():
    script = (
        "import sys; from pipeline.preload import preload; preload(); "
        "from pipeline import db; "
        "print(all(m in sys.modules for m in ('great_expectations', 'deid.dicom', 'pydicom',"
        " 'pyarrow.parquet', 'pipeline.batch')), db.engine.cache_info().currsize)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    # Modules only: no database engine (whose connections a fork would share) is made.
    assert out.stdout.split() == ["True", "0"]
