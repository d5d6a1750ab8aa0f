"""Event-driven intake: batches are picked up as they become READY, with nobody running a
command.

In a deployment the triggerer runs :class:`ReadyBatchTrigger` as the watcher of the inbox
asset (``dags/trialpipe_intake.py``): it polls the upload area and fires an event naming
the batches that became READY since it last fired, holding no worker slot while it waits.
The intake DAG then triggers one ingest run per named batch under :func:`ingest_run_id`,
which the batch ID alone decides: a batch announced twice (a restarted triggerer forgets
what it announced; two triggerers may watch one inbox) is still run once, because the
second trigger finds the run existing.

The trigger only reads. Claiming stays the ingest DAG's first task, so a batch waiting for
a slot of the ingest pool stays READY in the upload area. Nothing but batch IDs leaves this
module: no file name, manifest value or path inside a batch.

The triggerer must see the inbox the workers see (the data home mounted, or the same
``$TRIALPIPE_INBOX_URL``). A local inbox folder that does not exist is said once in the
triggerer's log, not taken for an empty inbox: a triggerer without the data home would
otherwise announce nothing, forever, in silence.

This module is imported when the intake DAG file is parsed, so it imports only the
standard library and Airflow's trigger base at module level.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

BATCH_IDS = "batch_ids"  # the event payload's one key


class InboxNotFound(Exception):
    """The upload area is a local folder that does not exist in this process: the data
    home is not mounted here, or nothing has created its folders yet."""


def ready_batch_ids(home: str | None = None) -> list[str]:
    """IDs of the batches waiting in the upload area (READY, not claimed), oldest first.

    ``home`` is the data home's root; None means ``$TRIALPIPE_HOME`` of this process.
    Raises :class:`InboxNotFound` (whose message is the inbox's path) when the upload area
    is a local folder that does not exist. (On an object store a prefix exists only while
    objects are under it, so there an absent inbox is an empty one.)
    """
    from pipeline import store
    from pipeline.home import data_home
    from pipeline.intake import ready_batches

    chosen = data_home(home)
    if store.is_local(chosen.inbox) and not chosen.inbox.is_dir():
        raise InboxNotFound(str(chosen.inbox))
    return [batch.batch_id for batch in ready_batches(chosen)]


class ReadyBatchTrigger(BaseEventTrigger):
    """Fires ``{"batch_ids": [...]}`` for the batches that became READY since its last event.

    :param poll_interval: seconds between two looks at the upload area.
    :param home: the data home's root; None means the triggerer's ``$TRIALPIPE_HOME``, so
        the serialized trigger names no path.
    """

    def __init__(self, poll_interval: float = 5.0, home: str | None = None) -> None:
        super().__init__()
        self.poll_interval = poll_interval
        self.home = home

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """Class path and keyword arguments, to re-create the trigger in the triggerer."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"poll_interval": self.poll_interval, "home": self.home},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll forever; yield one event per look that finds batches not announced before."""
        announced: set[str] = set()
        missing = False  # said once per absence, not at every look
        while True:
            try:
                # Listing folders blocks; the triggerer's event loop serves other triggers.
                ready = await asyncio.to_thread(ready_batch_ids, self.home)
            except InboxNotFound as error:
                if not missing:
                    self.log.warning(
                        "inbox %s does not exist: no batch can be announced until it does "
                        "(is the data home mounted in the triggerer? docs/deploy.md)",
                        error,
                    )
                missing = True
            except OSError as error:
                # A batch claimed mid-listing, a network filesystem's hiccup: look again.
                self.log.warning("inbox listing failed (%s); retrying", type(error).__name__)
            else:
                if missing:
                    self.log.info("inbox found; watching it")
                    missing = False
                # A claimed batch never returns under its ID: forget it, keep the set small.
                announced &= set(ready)
                new = [batch_id for batch_id in ready if batch_id not in announced]
                if new:
                    announced.update(new)
                    yield TriggerEvent({BATCH_IDS: new})
            await asyncio.sleep(self.poll_interval)


def ingest_run_id(batch_id: str) -> str:
    """The ID of a batch's event-triggered ingest run: the same for every announcement of
    the batch, so triggering it again finds the run existing instead of starting another.
    (``trialpipe run`` names its runs by batch and time instead: it resumes batches.)"""
    return f"batch__{batch_id}"


def ingest_requests(extras: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One ``TriggerDagRunOperator`` argument set (run ID, conf) per announced batch.

    ``extras`` are the ``extra`` fields of the inbox asset's events that started this
    intake run; Airflow files a trigger's payload under ``payload``. A batch named by
    several events is requested once, in order of first announcement.
    """
    batch_ids: dict[str, None] = {}
    for extra in extras:
        payload = extra.get("payload")
        if isinstance(payload, Mapping):
            for batch_id in payload.get(BATCH_IDS) or []:
                batch_ids[str(batch_id)] = None
    return [
        {"trigger_run_id": ingest_run_id(batch_id), "conf": {"batch_id": batch_id}}
        for batch_id in batch_ids
    ]
