"""Compaction: merge a partition's per-batch files into one file, changing no query result.

One file per batch keeps reruns simple but leaves thousands of small files, which slow
every scan. Compaction, under the table's exclusive lock, reads a partition's batch files,
writes their rows (sorted by batch) as ``compacted-<digest>.parquet`` with the list of the
batches it holds in its metadata, renames it into place, then deletes the batch files.

A crash between the rename and the deletions leaves a batch's rows twice; the next
compaction or batch rewrite in that partition first heals this, since a batch file next to a
compacted file that lists the same batch can only be such a leftover: rewriting a batch
always takes it out of compacted files first (:func:`pipeline.tables.write_batch`).

On an object store the same steps hold: the compacted object appears whole on its upload
(there is no rename), then the batch objects are deleted, and the same healing covers a
crash in between. The lock is the data home's, as for every table writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass

import pyarrow as pa

from pipeline import store, tables
from pipeline.home import DataHome
from pipeline.store import Location

log = logging.getLogger("trialpipe.compaction")

# A partition is compacted once it has at least this many batch files.
MIN_FILES = 2


@dataclass(frozen=True)
class Compacted:
    """What compaction did to one partition of one table."""

    table: str
    partition: str
    files_merged: int
    rows: int


def _batch_files(folder: Location) -> list[Location]:
    return tables.ordered(
        p for p in folder.glob("*.parquet") if not p.name.startswith(tables.COMPACTED_PREFIX)
    )


def compact_partition(home: DataHome, table: str, folder: Location) -> Compacted | None:
    """Merge the batch files of one partition folder; None when there is nothing to do."""
    with tables.locked(home, table, exclusive=True):
        tables.heal(folder)
        inputs = _batch_files(folder)
        if len(inputs) < MIN_FILES:
            return None
        schema = tables.TABLES[table]
        merged = pa.concat_tables([tables.read_parquet(p, schema) for p in inputs])
        merged = merged.sort_by([("batch_id", "ascending")])
        batches = sorted(p.stem for p in inputs)
        digest = hashlib.sha256("\n".join(batches).encode()).hexdigest()[:16]
        metadata = {tables.BATCHES_KEY: json.dumps(batches).encode()}
        target = folder / f"{tables.COMPACTED_PREFIX}{digest}.parquet"
        if target.exists():  # the same batches once compacted, since rewritten: keep both
            target = target.with_name(f"{target.stem}-{uuid.uuid4().hex[:8]}.parquet")
        tables.write_parquet(target, merged.replace_schema_metadata(metadata))
        for path in inputs:
            path.unlink()
    partition = store.relative(folder, home.parquet / table)
    log.info("compacted %s/%s: %d files, %d rows", table, partition, len(inputs), len(merged))
    return Compacted(table, partition, len(inputs), merged.num_rows)


def compact_all(home: DataHome) -> list[Compacted]:
    """Compact every partition of every table."""
    done = []
    for table in tables.TABLES:
        root = home.parquet / table
        for folder in tables.ordered(root.glob("protocol=*/site=*")) if root.exists() else []:
            result = compact_partition(home, table, folder)
            if result is not None:
                done.append(result)
    return done
