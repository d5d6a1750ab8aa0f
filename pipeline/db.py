"""SQLAlchemy engines for the ledger and the restricted store (SQLite or PostgreSQL)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy import Engine, MetaData, create_engine, event


@lru_cache(maxsize=8)
def engine(url: str) -> Engine:
    """One engine per URL per process. SQLite gets WAL and a long busy timeout because
    several Airflow task processes write the same file at once."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        eng = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(eng, "connect")
        def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return eng
    return create_engine(url, pool_pre_ping=True)


_created: set[tuple[str, int]] = set()


def ready(url: str, metadata: MetaData) -> Engine:
    """The engine for ``url`` with ``metadata``'s tables created (once per process)."""
    eng = engine(url)
    key = (url, id(metadata))
    if key not in _created:
        metadata.create_all(eng, checkfirst=True)
        _created.add(key)
    return eng
