"""Parquet tables for statisticians: explicit Arrow schemas, one file per batch.

Files live at ``parquet/<table>/protocol=<p>/site=<s>/<batch>.parquet`` (hive partitions),
so DuckDB or pyarrow read every batch as one table, and re-running a batch replaces its
file instead of appending. Only de-identified values ever reach a row.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.dataset import Dataset

from pipeline import atomic
from pipeline.home import DataHome

INSTANCES = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.string(), nullable=False),
        pa.field("arm", pa.string(), nullable=False),
        pa.field("visit", pa.string(), nullable=False),
        pa.field("study_uid", pa.string(), nullable=False),
        pa.field("series_uid", pa.string(), nullable=False),
        pa.field("sop_instance_uid", pa.string(), nullable=False),
        pa.field("sop_class_uid", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("study_day", pa.int32()),
        pa.field("series_number", pa.int32()),
        pa.field("instance_number", pa.int32()),
        pa.field("manufacturer", pa.string()),
        pa.field("model", pa.string()),
        pa.field("rows", pa.int32()),
        pa.field("columns", pa.int32()),
        pa.field("pixel_spacing_row_mm", pa.float64()),
        pa.field("pixel_spacing_col_mm", pa.float64()),
        pa.field("slice_thickness_mm", pa.float64()),
        pa.field("kvp", pa.float64()),
        pa.field("magnetic_field_strength_t", pa.float64()),
        pa.field("repetition_time_ms", pa.float64()),
        pa.field("echo_time_ms", pa.float64()),
        pa.field("file_size_bytes", pa.int64(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("archive_path", pa.string(), nullable=False),
        pa.field("recipe_version", pa.string(), nullable=False),
        pa.field("code_version", pa.string(), nullable=False),
    ]
)

TABLES = {"instances": INSTANCES}


def _float(value: Any, index: int = 0) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[index] if len(value) > index else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


def _date(value: Any) -> dt.date | None:
    text = str(value or "").strip()
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None


def _text(value: Any) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def instance_row(ds: Dataset, anchor: dt.date) -> dict[str, Any]:
    """The per-image columns of the instances table, from a de-identified dataset."""
    study_date = _date(ds.get("StudyDate"))
    return {
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.get("SeriesInstanceUID", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class_uid": _text(ds.get("SOPClassUID")),
        "modality": _text(ds.get("Modality")),
        "study_date": study_date,
        "study_day": (study_date - anchor).days if study_date else None,
        "series_number": _int(ds.get("SeriesNumber")),
        "instance_number": _int(ds.get("InstanceNumber")),
        "manufacturer": _text(ds.get("Manufacturer")),
        "model": _text(ds.get("ManufacturerModelName")),
        "rows": _int(ds.get("Rows")),
        "columns": _int(ds.get("Columns")),
        "pixel_spacing_row_mm": _float(ds.get("PixelSpacing"), 0),
        "pixel_spacing_col_mm": _float(ds.get("PixelSpacing"), 1),
        "slice_thickness_mm": _float(ds.get("SliceThickness")),
        "kvp": _float(ds.get("KVP")),
        "magnetic_field_strength_t": _float(ds.get("MagneticFieldStrength")),
        "repetition_time_ms": _float(ds.get("RepetitionTime")),
        "echo_time_ms": _float(ds.get("EchoTime")),
    }


def _cell(value: Any, is_date: bool) -> Any:
    # Rows travel between tasks as JSON, where dates are ISO strings.
    if is_date and isinstance(value, str):
        return dt.date.fromisoformat(value)
    return value


def write_batch(
    home: DataHome,
    table: str,
    protocol_id: str,
    site_id: str,
    batch_id: str,
    rows: list[dict[str, Any]],
) -> Path | None:
    """Replace the batch's file of ``table`` with ``rows`` (no rows: remove the file)."""
    schema = TABLES[table]
    target = home.table_file(table, protocol_id, site_id, batch_id)
    if not rows:
        target.unlink(missing_ok=True)
        return None
    dates = {f.name for f in schema if f.type == pa.date32()}
    arrow = pa.Table.from_pylist(
        [{name: _cell(row.get(name), name in dates) for name in schema.names} for row in rows],
        schema=schema,
    )
    atomic.write_with(target, lambda tmp: pq.write_table(arrow, tmp, compression="zstd"))
    return target


def read_table(home: DataHome, table: str) -> pa.Table:
    """All batches of ``table`` as one Arrow table, partition columns included."""
    import pyarrow.dataset as pads

    folder = home.parquet / table
    if not folder.exists():
        return TABLES[table].empty_table()
    dataset = pads.dataset(
        folder, format="parquet", partitioning="hive", exclude_invalid_files=True
    )
    return dataset.to_table()
