"""The restricted store: the crosswalk of original UIDs to pseudonyms, written safely."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy
from sqlalchemy import func, select

from pipeline import restricted
from pipeline.home import DataHome
from tests.conftest import fresh_postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, home, monkeypatch):
    """The home with its restricted store on SQLite (every deployment) or on a fresh
    PostgreSQL database (the same statements, under PostgreSQL's row locks)."""
    if request.param == "sqlite":
        yield home
        return
    with fresh_postgres() as url:
        monkeypatch.setattr(DataHome, "restricted_url", property(lambda _: url))
        yield home


def test_batches_recording_overlapping_crosswalks_at_once_all_succeed(any_store):
    """Four batches of one upload de-identified at once share its study and series UIDs
    (and, two of them, some instances), half in the reverse order: no error (none quoting
    an original UID into a task log), one row per original, the pseudonym it was given."""
    study = {("study", "1.2.3.1"): "2.25.1"}
    series = {("series", f"1.2.3.1.{n}"): f"2.25.1.{n}" for n in range(50)}
    instances = {("instance", f"1.2.3.1.9.{n}"): f"2.25.9.{n}" for n in range(200)}
    restricted.store(any_store)  # the tables exist before the batches race
    start = threading.Barrier(4)

    def record(number):
        shared = dict(list(instances.items())[number // 2 * 100 : number // 2 * 100 + 120])
        entries = {**study, **series, **shared}
        if number % 2:
            entries = dict(reversed(entries.items()))
        start.wait()
        restricted.record_crosswalk(any_store, "DEMO-01", entries)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(record, range(4)))  # re-raises any batch's error
    restricted.record_crosswalk(any_store, "DEMO-01", study)  # a retried batch adds nothing
    table = restricted.crosswalk
    with restricted.store(any_store).connect() as conn:
        rows = conn.execute(select(table.c.kind, table.c.original, table.c.pseudonym)).all()
        total = conn.execute(select(func.count()).select_from(table)).scalar()
    expected = {**study, **series, **instances}
    assert total == len(expected)
    assert {(r.kind, r.original): r.pseudonym for r in rows} == expected


def test_a_restricted_store_error_never_quotes_an_original_uid(home):
    """An error from the store (here a second plain insert of a crosswalk row) names the
    statement, never the original UID bound into it."""
    original = "1.2.826.0.1.3680043.2.1125.1.424242"
    row = {
        "protocol_id": "DEMO-01",
        "kind": "instance",
        "original": original,
        "pseudonym": "2.25.7",
    }
    with restricted.store(home).begin() as conn:
        conn.execute(restricted.crosswalk.insert(), row)
    with (
        pytest.raises(sqlalchemy.exc.IntegrityError) as refused,
        restricted.store(home).begin() as conn,
    ):
        conn.execute(restricted.crosswalk.insert(), row)
    assert "INSERT INTO crosswalk" in str(refused.value) and original not in str(refused.value)
