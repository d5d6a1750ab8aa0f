import datetime as dt

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import tables


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
        "file_size_bytes": 10,
        "sha256": "ab",
        "archive_path": f"x/{n}.dcm",
        "recipe_version": "r",
        "code_version": "c",
        **extra,
    }


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


def test_duckdb_reads_both_sites_partitions_as_one_table(home):
    tables.write_batch(home, "instances", "DEMO-01", "SITE-01", "b1", [_row(1), _row(2)])
    tables.write_batch(
        home, "instances", "DEMO-01", "SITE-02", "b2", [_row(3, batch_id="b2", arm="B")]
    )
    result = duckdb.sql(
        f"SELECT site, arm, count(*) FROM read_parquet('{home.parquet}/instances/**/*.parquet',"
        " hive_partitioning = true) GROUP BY ALL ORDER BY site"
    ).fetchall()
    assert result == [("SITE-01", "A", 2), ("SITE-02", "B", 1)]


def test_instance_rows_compute_the_study_day_from_the_anchor():
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.StudyDate = "20000315"
    ds.PixelSpacing = ["0.5", "0.7"]
    ds.KVP = "120"
    row = tables.instance_row(ds, dt.date(2000, 1, 1))
    assert row["study_day"] == 74
    assert (row["pixel_spacing_row_mm"], row["pixel_spacing_col_mm"]) == (0.5, 0.7)
    assert row["kvp"] == 120.0 and row["echo_time_ms"] is None
