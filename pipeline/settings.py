"""Deployment settings the DAG files read when Airflow parses them (so: no heavy imports)."""

from __future__ import annotations

import os

DEFAULT_INGEST_SLOTS = 4


class SettingError(ValueError):
    """A deployment setting holds a value it cannot have; the message names the setting."""


def ingest_slots() -> int:
    """``$TRIALPIPE_INGEST_SLOTS`` (default 4): how many batches are processed at once, as
    both the ingest pool's slots and the ingest DAG's active runs.

    Raises :class:`SettingError` when it is not a whole number of at least 1 (the
    DAG then fails to import with that message, where Airflow shows import errors).
    """
    value = os.environ.get("TRIALPIPE_INGEST_SLOTS") or str(DEFAULT_INGEST_SLOTS)
    if not value.strip().isdigit() or int(value) < 1:
        raise SettingError(
            f"TRIALPIPE_INGEST_SLOTS must be a whole number of at least 1, not {value!r}"
        )
    return int(value)
