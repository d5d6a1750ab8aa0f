"""Parquet tables for statisticians: explicit Arrow schemas, one file set per batch.

Layout: ``parquet/<table>/protocol=<p>/site=<s>/<batch>.parquet`` (hive partitions), so
DuckDB or pyarrow read every batch as one table, and re-running a batch replaces its file
instead of appending. Compaction (:mod:`pipeline.compaction`) later merges a partition's
small files into ``compacted-<digest>.parquet`` files that list the batches they hold in
their key-value metadata; rewriting a batch first takes its rows out of any compacted file,
so "one batch, one set of rows" holds before and after compaction.

Writers and compaction hold the table's exclusive lock; readers in trialpipe hold it shared,
so a query never sees a half-compacted partition. The tables may live on an object store
(``$TRIALPIPE_TABLES_URL``, :mod:`pipeline.store`): every file is then one object, written
whole under its final key, and the locks stay in the data home. Only de-identified values
reach a row. docs/data-dictionary.md documents every column; a test pins the schemas to it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import store
from pipeline.home import DataHome
from pipeline.store import Location

# Every file sits in a protocol=/site= folder, so the partition columns are never null.
PARTITIONS = pa.schema(
    [
        pa.field("protocol", pa.string(), nullable=False),
        pa.field("site", pa.string(), nullable=False),
    ]
)
# Partition value for a batch whose protocol or site could not be trusted (batches table).
UNKNOWN = "unknown"
COMPACTED_PREFIX = "compacted-"
BATCHES_KEY = b"trialpipe.batches"

_IDENTITY = [
    pa.field("batch_id", pa.string(), nullable=False),
    pa.field("subject_id", pa.string(), nullable=False),
    pa.field("arm", pa.string(), nullable=False),
    pa.field("visit", pa.string(), nullable=False),
]
_VERSIONS = [
    pa.field("recipe_version", pa.string(), nullable=False),
    pa.field("code_version", pa.string(), nullable=False),
]
_ACQUISITION = [
    pa.field("pixel_spacing_row_mm", pa.float64()),
    pa.field("pixel_spacing_col_mm", pa.float64()),
    pa.field("slice_thickness_mm", pa.float64()),
    pa.field("spacing_between_slices_mm", pa.float64()),
    pa.field("kvp", pa.float64()),
    pa.field("exposure_mas", pa.float64()),
    pa.field("tube_current_ma", pa.float64()),
    pa.field("convolution_kernel", pa.string()),
    pa.field("magnetic_field_strength_t", pa.float64()),
    pa.field("repetition_time_ms", pa.float64()),
    pa.field("echo_time_ms", pa.float64()),
    pa.field("flip_angle_deg", pa.float64()),
]

INSTANCES = pa.schema(
    [
        *_IDENTITY,
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("sop_instance_uid", pa.string(), nullable=False),
        pa.field("sop_class_uid", pa.string()),
        pa.field("transfer_syntax_uid", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("body_part", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("series_date", pa.date32()),
        pa.field("study_day", pa.int32()),
        pa.field("series_number", pa.int32()),
        pa.field("instance_number", pa.int32()),
        pa.field("manufacturer", pa.string()),
        pa.field("model", pa.string()),
        pa.field("rows", pa.int32()),
        pa.field("columns", pa.int32()),
        pa.field("frames", pa.int32()),
        pa.field("bits_allocated", pa.int32()),
        *_ACQUISITION,
        pa.field("image_position_mm", pa.list_(pa.float64())),
        pa.field("image_orientation", pa.list_(pa.float64())),
        pa.field("slice_location_mm", pa.float64()),
        pa.field("file_size_bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("archive_path", pa.string(), nullable=False),
        *_VERSIONS,
    ]
)

SERIES = pa.schema(
    [
        *_IDENTITY,
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("modality", pa.string()),
        pa.field("sop_class_uid", pa.string()),
        pa.field("body_part", pa.string()),
        pa.field("series_number", pa.int32()),
        pa.field("study_date", pa.date32()),
        pa.field("study_day", pa.int32()),
        pa.field("manufacturer", pa.string()),
        pa.field("model", pa.string()),
        pa.field("instances", pa.int32(), nullable=False),
        pa.field("total_bytes", pa.int64(), nullable=False),
        pa.field("rows", pa.int32()),
        pa.field("columns", pa.int32()),
        *_ACQUISITION,
        pa.field("coverage_mm", pa.float64()),
        *_VERSIONS,
    ]
)

BATCHES = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string()),
        pa.field("arm", pa.string()),
        pa.field("visit", pa.string()),
        pa.field("state", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("files", pa.int32(), nullable=False),
        pa.field("archived", pa.int32(), nullable=False),
        pa.field("quarantined", pa.int32(), nullable=False),
        pa.field("duplicates", pa.int32(), nullable=False),
        pa.field("released", pa.int32(), nullable=False),
        pa.field("flagged", pa.int32(), nullable=False),
        pa.field("bytes_uploaded", pa.int64(), nullable=False),
        pa.field("bytes_archived", pa.int64(), nullable=False),
        pa.field("uploaded_at", pa.timestamp("us", tz="UTC")),
        pa.field("claimed_at", pa.timestamp("us", tz="UTC")),
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("processing_seconds", pa.float64()),
        pa.field("qc_report", pa.string()),
        pa.field("recipe_version", pa.string()),
        pa.field("code_version", pa.string(), nullable=False),
    ]
)

QC_FINDINGS = pa.schema(
    [
        *_IDENTITY,
        pa.field("file_no", pa.int32(), nullable=False),
        pa.field("sop_instance_uid", pa.string()),
        pa.field("series_uid", pa.string()),
        pa.field("modality", pa.string(), nullable=False),
        pa.field("attribute", pa.string(), nullable=False),
        pa.field("expectation", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("observed", pa.string()),
        *_VERSIONS,
    ]
)

TABLES: dict[str, pa.Schema] = {
    "instances": INSTANCES,
    "series": SERIES,
    "batches": BATCHES,
    "qc_findings": QC_FINDINGS,
}


@contextlib.contextmanager
def locked(home: DataHome, table: str, exclusive: bool) -> Iterator[None]:
    """Hold the table's lock: exclusive to change files, shared to read them."""
    lock_file = home.table_locks / f"{table}.lock"
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def partition_dir(home: DataHome, table: str, protocol_id: str, site_id: str) -> Location:
    """The folder of one hive partition of ``table``."""
    return home.table_file(table, protocol_id, site_id, "x").parent


def compacted_batches(path: Location) -> list[str]:
    """The batch IDs a compacted file holds (from its key-value metadata)."""
    with path.open("rb") as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return list(json.loads(metadata.get(BATCHES_KEY, b"[]")))


def to_arrow(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts; dates may be ISO strings, as they travel as JSON) as an Arrow table."""
    schema = TABLES[table]
    converters = {f.name: _converter(f.type) for f in schema}
    return pa.Table.from_pylist(
        [{name: converters[name](row.get(name)) for name in schema.names} for row in rows],
        schema=schema,
    )


def _converter(kind: pa.DataType) -> Any:
    if kind == pa.date32():
        return lambda v: dt.date.fromisoformat(v) if isinstance(v, str) else v
    if pa.types.is_timestamp(kind):
        return lambda v: dt.datetime.fromisoformat(v) if isinstance(v, str) else v
    return lambda v: v


def write_parquet(path: Location, arrow: pa.Table) -> Location:
    """Write one table file whole (atomically), compressed, deterministic for the same rows."""
    store.write_with(path, lambda handle: pq.write_table(arrow, handle, compression="zstd"))
    return path


def read_parquet(path: Location, schema: pa.Schema | None = None) -> pa.Table:
    """One table file as an Arrow table."""
    with path.open("rb") as handle:
        return pq.read_table(handle, schema=schema)


def write_batch(
    home: DataHome,
    table: str,
    protocol_id: str,
    site_id: str,
    batch_id: str,
    rows: list[dict[str, Any]],
) -> Location | None:
    """Make ``rows`` the batch's rows of ``table``, replacing any earlier run's, whether
    they sit in the batch's own file or were compacted (no rows: the batch has none)."""
    arrow = to_arrow(table, rows)
    target = home.table_file(table, protocol_id, site_id, batch_id)
    with locked(home, table, exclusive=True):
        folder = target.parent
        if folder.exists():
            heal(folder)
            for compacted in ordered(folder.glob(f"{COMPACTED_PREFIX}*.parquet")):
                if batch_id in compacted_batches(compacted):
                    _drop_batch(compacted, batch_id)
        if not rows:
            target.unlink(missing_ok=True)
            return None
        return write_parquet(target, arrow)


def heal(folder: Location) -> int:
    """Delete batch files whose rows a compacted file already holds (left by a compaction
    interrupted between its rename and its deletions); return how many. Hold the lock."""
    removed = 0
    for compacted in ordered(folder.glob(f"{COMPACTED_PREFIX}*.parquet")):
        for batch_id in compacted_batches(compacted):
            leftover = folder / f"{batch_id}.parquet"
            if leftover.exists():
                leftover.unlink()
                removed += 1
    return removed


def _drop_batch(compacted: Location, batch_id: str) -> None:
    import pyarrow.compute as pc

    data = read_parquet(compacted)
    kept = data.filter(pc.not_equal(data["batch_id"], batch_id))
    batches = [b for b in compacted_batches(compacted) if b != batch_id]
    if not batches:
        compacted.unlink()
        return
    metadata = {**(data.schema.metadata or {}), BATCHES_KEY: json.dumps(batches).encode()}
    write_parquet(compacted, kept.replace_schema_metadata(metadata))


def table_files(home: DataHome, table: str) -> list[Location]:
    """Every data file of ``table`` (temporary files excluded)."""
    folder = home.parquet / table
    if not folder.exists():
        return []
    return ordered(folder.glob("protocol=*/site=*/*.parquet"))


def ordered(paths: Iterable[Location]) -> list[Location]:
    """``paths`` in path order (as ``sorted`` orders local paths), for any location."""
    return sorted(paths, key=lambda path: tuple(path.parts))


def read_table(home: DataHome, table: str) -> pa.Table:
    """All rows of ``table`` as one Arrow table, partition columns (protocol, site) last."""
    import pyarrow.dataset as pads

    schema = pa.unify_schemas([TABLES[table], PARTITIONS])
    with locked(home, table, exclusive=False):
        files = table_files(home, table)
        if not files:
            return schema.empty_table()
        root = home.parquet / table
        local = store.is_local(root)
        dataset = pads.dataset(
            [str(f) if local else f.path for f in files],
            schema=schema,
            format="parquet",
            partitioning=pads.partitioning(PARTITIONS, flavor="hive"),
            partition_base_dir=str(root) if local else root.path,
            filesystem=None if local else root.fs,
        )
        return dataset.to_table()
