"""DuckDB over the Parquet tables: each table is a view by its name.

``instances``, ``series``, ``batches`` and ``qc_findings`` read every partition (protocol and
site become columns) of the data home; a table with no file yet is an empty view with the
documented columns, so a query written today works on an empty trial too.

Tables on an object store are read through their fsspec filesystem (s3fs for ``s3://``),
registered with DuckDB: no DuckDB extension is needed (httpfs would be downloaded at run
time), and the credentials and endpoint are the pipeline's own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from pipeline import store, tables
from pipeline.home import DataHome


class QueryError(Exception):
    """The SQL could not run (syntax, unknown column, ...); the message says why."""


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]


@contextlib.contextmanager
def connect(home: DataHome) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB connection with one view per table. The tables' shared locks
    are held while it is open, so compaction cannot change files under a query."""
    with contextlib.ExitStack() as stack:
        for table in tables.TABLES:
            stack.enter_context(tables.locked(home, table, exclusive=False))
        con = duckdb.connect(":memory:")
        stack.callback(con.close)
        if not store.is_local(home.parquet):
            con.register_filesystem(home.parquet.fs)
        for table, schema in tables.TABLES.items():
            files = tables.table_files(home, table)
            if files:
                listed = ", ".join(_quote(str(f)) for f in files)
                con.execute(
                    f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listed}],"
                    " hive_partitioning = true,"
                    " hive_types = {'protocol': VARCHAR, 'site': VARCHAR})"
                )
            else:
                empty = pa.unify_schemas([schema, tables.PARTITIONS]).empty_table()
                con.register(f"_empty_{table}", empty)
                con.execute(f"CREATE VIEW {table} AS SELECT * FROM _empty_{table}")
        yield con


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def run(home: DataHome, sql: str) -> Result:
    """Run one SQL statement over the tables; raise :class:`QueryError` on bad SQL."""
    with connect(home) as con:
        try:
            cursor = con.execute(sql)
        except duckdb.Error as error:
            raise QueryError(str(error).splitlines()[0]) from None
        if cursor.description is None:
            return Result([], [])
        return Result([d[0] for d in cursor.description], cursor.fetchall())


def format_table(result: Result) -> str:
    """Rows as an aligned text table, the way a statistician reads them in a terminal."""
    cells = [[_show(v) for v in row] for row in result.rows]
    widths = [
        max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(result.columns)
    ]
    lines = [
        "  ".join(name.ljust(w) for name, w in zip(result.columns, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''})")
    return "\n".join(lines)


def _show(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
