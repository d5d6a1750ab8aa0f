"""The data home: every path the pipeline reads or writes, in one place.

Layout under ``$TRIALPIPE_HOME`` (default ``~/trialpipe-home``)::

    inbox/<protocol>/<site>/<batch>/     uploads: files/, manifest.json, READY      (PHI)
    inbox/.claimed/<batch>/              batches being processed, with staged output (PHI)
    quarantine/<batch>/                  refused originals + quarantine.json          (PHI)
    restricted/                          secrets, crosswalk, enrollment, originals    (PHI)
    archive/<protocol>/<arm>/<subject>/<visit>/<study>/<series>/<instance>.dcm
    parquet/<table>/protocol=<p>/site=<s>/<batch>.parquet   (and compacted-*.parquet)
    reports/qc/<batch>/index.html        GX Data Docs: the batch's required-tag validation
    reports/arms/<protocol>/             arm comparison report (HTML + CSV)
    batches/<batch>.json                 batch record: state and every file's disposition
    ledger.sqlite                        audit ledger (no PHI)
    airflow/                             embedded Airflow home: metadata DB, logs

Only inbox/, quarantine/ and restricted/ may ever hold original identifiers.

The archive and the tables, which hold none, may live elsewhere: ``$TRIALPIPE_ARCHIVE_URL``
and ``$TRIALPIPE_TABLES_URL`` take a local path or an fsspec URL such as
``s3://bucket/prefix`` (see :mod:`pipeline.store`). So may the quarantine
(``$TRIALPIPE_QUARANTINE_URL``) and the upload area (``$TRIALPIPE_INBOX_URL``), whose
locations must then be as private as the restricted store: they hold originals. Everything
else, the claimed batches and the tables' locks included, stays under the data home, which
must be a POSIX filesystem.

A deployment keeps its secrets out of the data home and out of the environment:
``$TRIALPIPE_SECRETS_DIR`` names a read-only folder of per-trial keys (``<protocol>.key``,
e.g. a mounted Docker or Kubernetes secret), and ``$TRIALPIPE_LEDGER_URL_CMD`` a command that
prints the ledger's database URL (Airflow's ``_CMD`` convention), so its password stays in a file.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.store import Location, location

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent


def recipes_dir() -> Path:
    """Folder of protocol definitions (``recipes/``); ``$TRIALPIPE_RECIPES`` overrides."""
    return Path(os.environ.get("TRIALPIPE_RECIPES", REPO_ROOT / "recipes"))


def dags_dir() -> Path:
    """Folder of the Airflow DAG files (``dags/``); ``$TRIALPIPE_DAGS`` overrides."""
    return Path(os.environ.get("TRIALPIPE_DAGS", REPO_ROOT / "dags"))


def safe_relative(path: str) -> str | None:
    """``path`` as a relative path inside a batch, or None if it would leave the batch
    (absolute, ``..``, a drive letter, a NUL byte)."""
    normal = path.replace("\\", "/")
    parts = [p for p in normal.split("/") if p not in ("", ".")]
    if (
        not parts
        or normal.startswith("/")
        or ".." in parts
        or "\x00" in normal
        or (len(parts[0]) == 2 and parts[0][1] == ":")
    ):
        return None
    return "/".join(parts)


@dataclass(frozen=True)
class DataHome:
    """Paths of one data home. Create with :func:`data_home`."""

    root: Path
    ledger_override: str | None = None
    secrets_override: Path | None = None
    archive_url: str | None = None
    tables_url: str | None = None
    quarantine_url: str | None = None
    inbox_url: str | None = None
    # $TRIALPIPE_LEDGER_URL_CMD, run when the ledger's URL is first asked for: a component
    # that never opens the ledger (the triggerer's inbox watcher) never runs it.
    ledger_command: str | None = None

    @property
    def inbox(self) -> Location:
        """The upload area: ``inbox/`` here, or ``$TRIALPIPE_INBOX_URL``."""
        return location(self.inbox_url) if self.inbox_url else self.root / "inbox"

    @property
    def claimed(self) -> Path:
        """Claimed batches: always in the data home, whose renames and locks decide a claim."""
        return self.root / "inbox" / ".claimed"

    @property
    def quarantine(self) -> Location:
        """Refused originals: ``quarantine/`` here, or ``$TRIALPIPE_QUARANTINE_URL``."""
        return location(self.quarantine_url) if self.quarantine_url else self.root / "quarantine"

    @property
    def restricted(self) -> Path:
        return self.root / "restricted"

    @property
    def archive(self) -> Location:
        """The arm archive: ``archive/`` here, or ``$TRIALPIPE_ARCHIVE_URL``."""
        return location(self.archive_url) if self.archive_url else self.root / "archive"

    @property
    def parquet(self) -> Location:
        """The Parquet tables: ``parquet/`` here, or ``$TRIALPIPE_TABLES_URL``."""
        return location(self.tables_url) if self.tables_url else self.root / "parquet"

    @property
    def table_locks(self) -> Path:
        """The tables' lock files: always in the data home (an object store has no locks)."""
        return self.root / "parquet" / ".locks"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def qc_report(self, batch_id: str) -> Path:
        """Folder of the batch's GX Data Docs site (``index.html`` inside)."""
        return self.reports / "qc" / batch_id

    @property
    def airflow(self) -> Path:
        return self.root / "airflow"

    @property
    def ledger_url(self) -> str:
        """The audit ledger's SQLAlchemy URL (default: SQLite in the data home)."""
        if self.ledger_override:
            return self.ledger_override
        if self.ledger_command:
            return _command_output(self.ledger_command)
        return f"sqlite:///{self.root / 'ledger.sqlite'}"

    @property
    def restricted_url(self) -> str:
        return f"sqlite:///{self.restricted / 'trial.sqlite'}"

    @property
    def provides_secrets(self) -> bool:
        """True when the deployment provides the trial keys (``$TRIALPIPE_SECRETS_DIR``)."""
        return self.secrets_override is not None

    def secret_file(self, protocol_id: str) -> Path:
        folder = self.secrets_override or self.restricted / "secrets"
        return folder / f"{protocol_id}.key"

    def batch_upload_dir(self, protocol_id: str, site_id: str, batch_id: str) -> Location:
        return self.inbox / protocol_id / site_id / batch_id

    def claimed_batch(self, batch_id: str) -> Path:
        return self.claimed / batch_id

    def originals(self, batch_id: str) -> Path:
        return self.restricted / "originals" / batch_id

    def batch_record(self, batch_id: str) -> Path:
        return self.root / "batches" / f"{batch_id}.json"

    def quarantined_batch(self, batch_id: str) -> Location:
        return self.quarantine / batch_id

    def table_file(self, table: str, protocol_id: str, site_id: str, batch_id: str) -> Location:
        return (
            self.parquet
            / table
            / f"protocol={protocol_id}"
            / f"site={site_id}"
            / f"{batch_id}.parquet"
        )

    def archive_file(
        self,
        protocol_id: str,
        arm: str,
        subject: str,
        visit: str,
        study: str,
        series: str,
        instance: str,
    ) -> Location:
        return (
            self.archive / protocol_id / arm / subject / visit / study / series / f"{instance}.dcm"
        )

    def ensure(self) -> DataHome:
        """Create the top-level folders (restricted/ readable by the owner only); a location
        on an object store needs none (its bucket must exist)."""
        for path in (
            self.inbox,
            self.claimed,
            self.quarantine,
            self.archive,
            self.parquet,
            self.table_locks.parent,
            self.airflow,
        ):
            if isinstance(path, Path):
                path.mkdir(parents=True, exist_ok=True)
        self.restricted.mkdir(parents=True, exist_ok=True)
        os.chmod(self.restricted, 0o700)
        return self


def data_home(root: str | Path | None = None) -> DataHome:
    """The data home at ``root``, else ``$TRIALPIPE_HOME``, else ``~/trialpipe-home``.

    ``$TRIALPIPE_LEDGER_URL`` (a SQLAlchemy URL), or the output of the command in
    ``$TRIALPIPE_LEDGER_URL_CMD``, moves the ledger to a database server.
    ``$TRIALPIPE_SECRETS_DIR`` reads the trial keys from a folder the deployment provides.
    ``$TRIALPIPE_ARCHIVE_URL``, ``$TRIALPIPE_TABLES_URL``, ``$TRIALPIPE_QUARANTINE_URL`` and
    ``$TRIALPIPE_INBOX_URL`` move the archive, the tables, the quarantine and the upload area
    (a path or an fsspec URL, e.g. ``s3://bucket/prefix``).
    """
    chosen = root or os.environ.get("TRIALPIPE_HOME") or Path.home() / "trialpipe-home"
    secrets = os.environ.get("TRIALPIPE_SECRETS_DIR")
    return DataHome(
        Path(chosen).expanduser().resolve(),
        os.environ.get("TRIALPIPE_LEDGER_URL") or None,
        Path(secrets) if secrets else None,
        os.environ.get("TRIALPIPE_ARCHIVE_URL") or None,
        os.environ.get("TRIALPIPE_TABLES_URL") or None,
        os.environ.get("TRIALPIPE_QUARANTINE_URL") or None,
        os.environ.get("TRIALPIPE_INBOX_URL") or None,
        os.environ.get("TRIALPIPE_LEDGER_URL_CMD") or None,
    )


@lru_cache(maxsize=4)
def _command_output(command: str) -> str:
    """What ``command`` prints, stripped; run once per process (every task asks again)."""
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        # The command's output may hold the password it failed to deliver: not repeated here.
        raise RuntimeError(f"TRIALPIPE_LEDGER_URL_CMD failed with exit code {done.returncode}")
    return done.stdout.strip()
