"""The inbox watcher: each READY batch is announced once, claimed batches never, and an
announcement repeated by a restarted triggerer still asks for the same single ingest run."""

import asyncio
import time

from structlog.testing import capture_logs

from pipeline import intake
from pipeline.home import data_home
from pipeline.watch import BATCH_IDS, ReadyBatchTrigger, ingest_requests, ingest_run_id


def _stage(home, tmp_path, name="scan.dcm"):
    source = tmp_path / name
    source.write_bytes(b"not read by the watcher")
    # check=False: a drop-folder batch; the watcher does not care what the batch holds.
    return intake.stage_batch(
        home, "DEMO-01", "SITE-01", "DEMO-01-01001", "BASELINE", [source], check=False
    )


async def _until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the trigger did not fire in time"
        await asyncio.sleep(0.02)


def _watch(home, scenario):
    """Run the trigger as the triggerer does while ``scenario(events)`` acts on the inbox."""

    async def main():
        events = []

        async def collect():
            async for event in ReadyBatchTrigger(poll_interval=0.05, home=str(home.root)).run():
                events.append(event.payload)

        watcher = asyncio.create_task(collect())
        try:
            await scenario(events)
        finally:
            watcher.cancel()
        return events

    return asyncio.run(main())


def test_each_ready_batch_is_announced_once(home, tmp_path):
    first = [_stage(home, tmp_path), _stage(home, tmp_path)]
    later = []

    async def scenario(events):
        await _until(lambda: len(events) == 1)
        later.append(_stage(home, tmp_path))
        await _until(lambda: len(events) == 2)
        await asyncio.sleep(0.3)  # several more looks at an unchanged inbox

    events = _watch(home, scenario)
    assert [set(event) for event in events] == [{BATCH_IDS}, {BATCH_IDS}]  # IDs, nothing else
    assert [sorted(event[BATCH_IDS]) for event in events] == [sorted(first), later]


def test_a_claimed_batch_is_not_announced(home, tmp_path):
    claimed, waiting = _stage(home, tmp_path), _stage(home, tmp_path)
    intake.claim(home, claimed)

    async def scenario(events):
        await _until(lambda: events)
        await asyncio.sleep(0.2)

    assert _watch(home, scenario) == [{BATCH_IDS: [waiting]}]


def test_the_watcher_only_reads_the_inbox(home, tmp_path):
    batch_id = _stage(home, tmp_path)
    before = sorted(p.relative_to(home.root) for p in home.root.rglob("*"))

    async def scenario(events):
        await _until(lambda: events)

    _watch(home, scenario)
    assert intake.find_upload(home, batch_id) is not None  # still READY, not claimed
    assert sorted(p.relative_to(home.root) for p in home.root.rglob("*")) == before


def test_a_watcher_that_cannot_see_its_inbox_says_so_once_then_watches_it(tmp_path):
    # A triggerer without the data home mounted: its inbox folder is not there.
    home = data_home(tmp_path / "not-mounted")
    staged = []

    async def scenario(events):
        await asyncio.sleep(0.4)  # several looks at the missing inbox
        assert events == []
        staged.append(_stage(home, tmp_path))  # the folders appear with the first upload
        await _until(lambda: events)

    with capture_logs() as logs:
        events = _watch(home, scenario)
    assert events == [{BATCH_IDS: staged}]
    said = [(entry["log_level"], entry["event"]) for entry in logs]
    missing = [event for level, event in said if "does not exist" in event]
    assert len(missing) == 1 and ("warning", missing[0]) in said
    assert str(home.inbox) in missing[0] and "data home" in missing[0]
    assert ("info", "inbox found; watching it") in said


def test_a_batch_announced_twice_asks_for_one_run_named_by_the_batch():
    # A restarted triggerer announces what is still READY again, in a later event.
    extras = [
        {"from_trigger": True, "payload": {BATCH_IDS: ["b-1", "b-2"]}},
        {"from_trigger": True, "payload": {BATCH_IDS: ["b-2", "b-3"]}},
        {"note": "an event posted by hand, without a trigger payload"},
    ]
    assert ingest_requests(extras) == [
        {"trigger_run_id": "batch__b-1", "conf": {"batch_id": "b-1"}},
        {"trigger_run_id": "batch__b-2", "conf": {"batch_id": "b-2"}},
        {"trigger_run_id": "batch__b-3", "conf": {"batch_id": "b-3"}},
    ]
    assert ingest_run_id("b-2") == ingest_run_id("b-2")


def test_the_trigger_serializes_to_what_recreates_it():
    classpath, kwargs = ReadyBatchTrigger(poll_interval=2.0).serialize()
    assert classpath == "pipeline.watch.ReadyBatchTrigger"
    assert kwargs == {"poll_interval": 2.0, "home": None}  # no path: the triggerer's home
    assert ReadyBatchTrigger(**kwargs).serialize() == (classpath, kwargs)


def test_the_watcher_sees_the_inbox_without_resolving_the_ledger(home, tmp_path, monkeypatch):
    """The triggerer's watcher only lists the upload area: a ledger-URL command that cannot
    run there (its secret is mounted for the workers) must not stop it."""
    from pipeline.watch import ready_batch_ids

    staged = _stage(home, tmp_path)
    monkeypatch.delenv("TRIALPIPE_LEDGER_URL", raising=False)
    monkeypatch.setenv("TRIALPIPE_LEDGER_URL_CMD", "false")
    assert ready_batch_ids(str(home.root)) == [staged]
