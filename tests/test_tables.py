"""The Parquet tables: pinned schemas, replace-on-rerun, compaction that changes no result."""

import datetime as dt
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import compaction, query, rows, tables
from pipeline.home import REPO_ROOT

DICTIONARY = REPO_ROOT / "docs" / "data-dictionary.md"


def _row(n, **extra):
    return {
        "batch_id": "b1",
        "subject_id": "S-1",
        "arm": "A",
        "visit": "BASELINE",
        "study_uid": "2.25.1",
        "series_uid": "2.25.2",
        "sop_instance_uid": f"2.25.3{n}",
        "study_date": "2000-01-05",
        "study_day": 4,
        "image_position_mm": [0.0, 0.0, float(n)],
        "file_size_bytes": 10,
        "sha256": "ab",
        "archive_path": f"x/{n}.dcm",
        "recipe_version": "r",
        "code_version": "c",
        **extra,
    }


def _type_name(kind: pa.DataType) -> str:
    names = {"double": "float64", "date32[day]": "date32", "timestamp[us, tz=UTC]": "timestamp"}
    if pa.types.is_list(kind):
        return f"list<{_type_name(kind.value_type)}>"
    return names.get(str(kind), str(kind))


def _documented(table: str) -> list[tuple[str, str, bool]]:
    """(column, type, nullable) in the order docs/data-dictionary.md lists them."""
    text = DICTIONARY.read_text()
    section = re.search(rf"^## {table}\b.*?$(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, f"docs/data-dictionary.md has no section for {table}"
    columns = []
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            assert cells[2] in ("yes", "no"), f"{table}.{cells[0]}: nullable is yes or no"
            for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                columns.append((name, cells[1], cells[2] == "yes"))
    return columns


@pytest.mark.parametrize("table", sorted(tables.TABLES))
def test_each_schema_is_exactly_the_documented_data_dictionary(table):
    """Names, order, types and nullability, partition columns last (as a query sees them)."""
    fields = [*tables.TABLES[table], *tables.PARTITIONS]
    actual = [(f.name, _type_name(f.type), f.nullable) for f in fields]
    assert _documented(table) == actual, (
        f"the {table} schema changed: update docs/data-dictionary.md with it"
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.set(0, pa.field("batch", pa.string(), nullable=False)),  # renamed
        lambda s: s.set(0, pa.field("batch_id", pa.large_string(), nullable=False)),  # retyped
        lambda s: s.set(0, pa.field("batch_id", pa.string(), nullable=True)),  # may be null
        lambda s: pa.schema([s.field(1), s.field(0), *list(s)[2:]]),  # reordered
    ],
    ids=["renamed", "retyped", "nullable", "reordered"],
)
def test_the_schema_pin_fails_when_a_column_changes(monkeypatch, change):
    """The pin above is not vacuous: any change to a column breaks it."""
    monkeypatch.setitem(tables.TABLES, "instances", change(tables.INSTANCES))
    with pytest.raises(AssertionError):
        test_each_schema_is_exactly_the_documented_data_dictionary("instances")


def test_instances_are_written_with_the_explicit_schema(home):
    path = tables.write_batch(home, "instances", "DEMO-01", "SITE-01", "b1", [_row(1)])
    assert path == home.parquet / "instances/protocol=DEMO-01/site=SITE-01/b1.parquet"
    schema = pq.read_schema(path)
    assert schema.field("study_date").type == pa.date32()
    assert schema.field("study_day").type == pa.int32()
    assert schema.names == tables.INSTANCES.names
    assert pq.read_table(path).to_pylist()[0]["study_date"] == dt.date(2000, 1, 5)


def test_rewriting_a_batch_replaces_its_rows(home):
    tables.write_batch(home, "instances", "DEMO-01", "SITE-01", "b1", [_row(1), _row(2)])
    tables.write_batch(home, "instances", "DEMO-01", "SITE-01", "b1", [_row(1)])
    assert tables.read_table(home, "instances").num_rows == 1
    tables.write_batch(home, "instances", "DEMO-01", "SITE-01", "b1", [])
    assert tables.read_table(home, "instances").num_rows == 0


def test_a_duckdb_query_spans_both_sites_partitions(home):
    tables.write_batch(home, "instances", "DEMO-01", "SITE-01", "b1", [_row(1), _row(2)])
    tables.write_batch(
        home, "instances", "DEMO-01", "SITE-02", "b2", [_row(3, batch_id="b2", arm="B")]
    )
    result = query.run(home, "SELECT site, arm, count(*) FROM instances GROUP BY ALL ORDER BY site")
    assert result.rows == [("SITE-01", "A", 2), ("SITE-02", "B", 1)]


def test_a_table_without_files_is_an_empty_view_with_every_column(home):
    result = query.run(home, "SELECT * FROM qc_findings")
    assert result.rows == []
    assert result.columns == [*tables.QC_FINDINGS.names, "protocol", "site"]


def test_bad_sql_is_a_query_error_not_a_traceback(home):
    with pytest.raises(query.QueryError, match="nothing"):
        query.run(home, "SELECT * FROM nothing")


def _three_batches(home):
    for n, site in ((1, "SITE-01"), (2, "SITE-01"), (3, "SITE-02"), (4, "SITE-01")):
        tables.write_batch(
            home,
            "instances",
            "DEMO-01",
            site,
            f"b{n}",
            [_row(n * 10 + i, batch_id=f"b{n}") for i in range(3)],
        )


def _everything(home):
    return query.run(home, "SELECT * FROM instances ORDER BY sop_instance_uid").rows


def test_compaction_merges_small_files_without_changing_any_query_result(home):
    _three_batches(home)
    before = _everything(home)
    done = compaction.compact_all(home)
    assert [(c.partition, c.files_merged) for c in done] == [("protocol=DEMO-01/site=SITE-01", 3)]
    files = tables.table_files(home, "instances")
    assert [f.name for f in files if "SITE-01" in str(f)] == [
        next(f.name for f in files if f.name.startswith("compacted-"))
    ]
    assert _everything(home) == before
    assert tables.read_table(home, "instances").num_rows == len(before) == 12
    assert compaction.compact_all(home) == []  # nothing left to merge


def test_rewriting_a_compacted_batch_replaces_its_rows_there(home):
    _three_batches(home)
    compaction.compact_all(home)
    tables.write_batch(home, "instances", "DEMO-01", "SITE-01", "b2", [_row(99, batch_id="b2")])
    counts = query.run(home, "SELECT batch_id, count(*) FROM instances GROUP BY 1 ORDER BY 1")
    assert counts.rows == [("b1", 3), ("b2", 1), ("b3", 3), ("b4", 3)]
    (compacted,) = [f for f in tables.table_files(home, "instances") if "compacted" in f.name]
    assert tables.compacted_batches(compacted) == ["b1", "b4"]


def test_an_interrupted_compaction_is_healed_before_anyone_writes_again(home):
    _three_batches(home)
    small = home.table_file("instances", "DEMO-01", "SITE-01", "b1")
    saved = small.read_bytes()
    before = _everything(home)
    compaction.compact_all(home)
    small.write_bytes(saved)  # as if the compaction died before deleting its inputs
    assert compaction.compact_all(home) == []
    assert not small.exists()
    assert _everything(home) == before


def test_instance_rows_take_typed_values_from_the_deidentified_header():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.StudyDate = "20000315"
    ds.PixelSpacing = ["0.5", "0.7"]
    ds.KVP = "120"
    ds.ImagePositionPatient = ["1", "2", "-30.5"]
    ds.ConvolutionKernel = ["B30f", "3"]
    row = rows.instance_row(ds, dt.date(2000, 1, 1))
    assert row["study_day"] == 74
    assert (row["pixel_spacing_row_mm"], row["pixel_spacing_col_mm"]) == (0.5, 0.7)
    assert row["kvp"] == 120.0 and row["echo_time_ms"] is None
    assert row["image_position_mm"] == [1.0, 2.0, -30.5]
    assert row["convolution_kernel"] == "B30f\\3"


def test_series_rows_count_instances_and_take_the_shared_parameters():
    members = [
        _row(i, modality="CT", kvp=120.0 if i != 2 else 100.0, file_size_bytes=100)
        for i in range(1, 4)
    ]
    (series,) = rows.series_rows(members)
    assert series["instances"] == 3 and series["total_bytes"] == 300
    assert series["kvp"] == 120.0
    assert series["coverage_mm"] == 2.0


def test_every_table_accepts_the_rows_the_pipeline_builds(home):
    """to_arrow takes JSON-travelled rows (ISO dates, timestamps) for every table."""
    table = tables.to_arrow(
        "batches",
        [
            {
                "batch_id": "b1",
                "state": "done",
                "files": 1,
                "archived": 1,
                "quarantined": 0,
                "duplicates": 0,
                "flagged": 0,
                "bytes_uploaded": 5,
                "bytes_archived": 6,
                "claimed_at": "2026-01-02T03:04:05+00:00",
                "code_version": "c",
            }
        ],
    )
    assert table.column("claimed_at")[0].as_py() == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
