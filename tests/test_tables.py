"""The Parquet tables: pinned schemas, replace-on-rerun, compaction that changes no result."""

import datetime as dt
import random
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
    row = rows.instance_row(ds, dt.date(2000, 1, 1), "PixelData" in ds)
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


def _worklist_that_travelled(tmp_path):
    """A batch's worklist after validate, saved and loaded as the tasks hand it on (JSON:
    dates as ISO text): a CT and an MR series' header rows, a finding on one file."""
    from pipeline import synth
    from pipeline.reasons import Reason
    from pipeline.validate import Finding
    from pipeline.worklist import FileEntry, Worklist

    rng = random.Random(5)
    patient = synth.make_patient(rng, "SITE-01")
    shape = synth.SeriesShape(rows=8, columns=8, slices=2)
    datasets = [
        ds
        for modality in ("CT", "MR")
        for ds in synth.make_series(
            patient, modality, dt.date(2000, 1, 8), f"2.25.{len(modality)}", "X", shape, rng
        )
    ]
    worklist = Worklist("b1", "DEMO-01", "SITE-01", "DEMO-01-01001", "BASELINE", arm="A")
    for n, ds in enumerate(datasets):
        row = rows.instance_row(ds, dt.date(2000, 1, 1), "PixelData" in ds)
        entry = FileEntry(n, f"f{n}.dcm", sha256="in", size=100, sha256_out=f"out{n}")
        entry.size_out, entry.archive_path = 120, f"DEMO-01/A/x/{n}.dcm"
        entry.sop_uid, entry.series_uid = row["sop_instance_uid"], row["series_uid"]
        entry.row = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}
        worklist.files.append(entry)
    flag = Finding(1, "ConvolutionKernel", Reason.MISSING_REQUIRED_TAG, False, "CT", "x_not_null")
    worklist.files[1].findings.append(flag.record())
    worklist.qc_report = "reports/qc/b1/index.html"
    return Worklist.load(worklist.save(tmp_path / "validate.json"))


def test_every_table_accepts_the_rows_the_pipeline_builds(home, protocol, tmp_path):
    """The row builders the tasks use, on rows that travelled as JSON, fill every column
    of every table (no column left out, none made up) and write with the pinned schema."""
    from pipeline.batch import _record

    worklist = _worklist_that_travelled(tmp_path)
    versions = {"recipe_version": protocol.recipe_version, "code_version": "c"}
    instances = rows.instance_rows(worklist, versions)
    records = [_record(worklist, e) for e in worklist.files]  # as finalize records them
    claimed = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    times = {
        "uploaded_at": claimed - dt.timedelta(minutes=5),
        "claimed_at": claimed,
        "finished_at": claimed + dt.timedelta(seconds=90),
    }
    built = {
        "instances": instances,
        "series": rows.series_rows(instances),
        "batches": [rows.batch_row(worklist, protocol, "done", records, times, "c")],
        "qc_findings": rows.finding_rows(worklist, versions),
    }
    for table, table_rows in built.items():
        for row in table_rows:
            assert set(row) == set(tables.TABLES[table].names), table
        tables.write_batch(home, table, "DEMO-01", "SITE-01", "b1", table_rows)
    read = {table: tables.read_table(home, table).to_pylist() for table in built}
    assert {t: len(r) for t, r in read.items()} == {
        "instances": 4,
        "series": 2,
        "batches": 1,
        "qc_findings": 1,
    }
    first = min(read["instances"], key=lambda r: r["sop_instance_uid"])
    assert first["study_date"] == dt.date(2000, 1, 8) and first["study_day"] == 7
    assert isinstance(first["pixel_spacing_row_mm"], float)
    (series,) = [r for r in read["series"] if r["modality"] == "CT"]
    assert series["instances"] == 2 and series["total_bytes"] == 240
    (row,) = read["batches"]
    assert (row["claimed_at"], row["processing_seconds"]) == (claimed, 90.0)
    # All four archived; file 1, whose finding flags it, counted as flagged.
    assert (row["archived"], row["flagged"], row["visit"]) == (4, 1, "BASELINE")
    (finding,) = read["qc_findings"]
    assert (finding["file_no"], finding["action"]) == (1, "flag")
    assert finding["sop_instance_uid"] == worklist.files[1].sop_uid
