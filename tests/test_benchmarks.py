"""`make bench` works end to end: every contender runs on the same files and the report
carries a ratio for each. (Speed itself is measured by `make bench`, never asserted here.)"""

import json
import subprocess
import sys

from benchmarks.run import (
    IMPORTS,
    ONE,
    PLAIN,
    START,
    WORKER_IMPORTS,
    _fixed_and_per_file,
    _start_up_floor,
    _waiting,
    report,
)


def test_the_benchmark_runs_every_contender_on_the_same_files(tmp_path):
    out, raw, work = tmp_path / "benchmarks.md", tmp_path / "raw.json", tmp_path / "work"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--ct",
            "4",
            "--mr",
            "2",
            "--small",
            "0",
            "--dag-files",
            "0",
            "--repeat",
            "2",
            "--work",
            str(work),
            "--keep",
            "--out",
            str(out),
            "--json",
            str(raw),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    rows = json.loads(raw.read_text())
    contenders = {
        "plain pydicom read+write",
        "deid replace_identifiers (naive)",
        "dicognito",
        "trialpipe deid (1 process)",
        "trialpipe deid (2 processes)",
        "trialpipe library pipeline (1 process)",
        "trialpipe library pipeline (2 processes)",
    }
    for corpus in ("CT 4", "MR 2", "CT 1"):
        assert {r["contender"] for r in rows if r["corpus"] == corpus} == contenders
    assert {r["contender"] for r in rows if r["corpus"] == START} == {IMPORTS, WORKER_IMPORTS}
    for row in rows:
        assert len(row["rounds"]) == 2
        if row["corpus"] != START:
            assert row["files"] == int(row["corpus"].split()[-1]) and row["x_plain"] > 0
    for name in ("plain", "deid", "dicognito", "trialpipe-1", "trialpipe-2"):
        written = list((work / "out" / "CT 4" / name).glob("*.dcm"))
        assert len(written) == 4, name
    text = out.read_text()
    assert "| CT 4 | trialpipe library pipeline (1 process) | 4 |" in text and "cores" in text
    assert report(rows, "x").count("target ≥ 0.5×") == 2
    assert report(rows, "x").count("target ≥ 1.8×") == 2
    # Each tool's fixed cost and per-file cost, from the one-slice run beside the CT run
    # (four files may not tell them apart: test_the_report_splits_fixed_and_per_file_cost).
    assert report(rows, "x").count("  - once started: ") == 2
    assert report(rows, "x").count("  - start-up floor: ") == 1


def _row(corpus, contender, files, wall_s):
    return {"corpus": corpus, "contender": contender, "files": files, "wall_s": wall_s}


def test_the_report_splits_fixed_and_per_file_cost():
    rows = []
    for contender, one, thousand in (
        (PLAIN, 1.0, 5.995),  # 5 ms a file after a 1 s start
        ("trialpipe deid (1 process)", 6.0, 16.99),  # 11 ms a file after 6 s
        ("trialpipe deid (2 processes)", 6.2, 12.194),  # 6 ms a file
    ):
        rows += [_row(ONE, contender, 1, one), _row("CT 1000", contender, 1000, thousand)]
    by = {(r["corpus"], r["contender"]): r for r in rows}
    assert _fixed_and_per_file(by, "CT 1000", "trialpipe deid") == (
        "  - once started: 6.0 s before the first file is done (plain: 1.0 s), then 11.0 ms"
        " a file in one process (plain: 5.0 ms), 0.45× plain per file; 6.0 ms a file on 2"
        " processes, 1.83× faster."
    )
    assert _fixed_and_per_file(by, "CT 1000", "trialpipe library pipeline") == ""


def test_the_report_bounds_the_targets_by_the_start_up():
    rows = [
        _row(ONE, PLAIN, 1, 0.5),
        _row("CT 1000", PLAIN, 1000, 4.5),  # 4 s of files after a 0.5 s start
        _row(START, IMPORTS, 0, 3.0),
        _row(START, WORKER_IMPORTS, 0, 1.5),
    ]
    by = {(r["corpus"], r["contender"]): r for r in rows}
    # 4.5 / (3 + 4) = 0.64; 2 x 4.5 / 9 = 1.0 s allowed for the workers' 1.5 s.
    assert _start_up_floor(by, "CT 1000") == (
        "  - start-up floor: trialpipe's imports alone take 3.0 s (1.5 s of them what every"
        " worker needs); were every file then as cheap as plain's (4.0 s for all), the"
        " 1-process ratio would be 0.64×. Both targets together need the workers' start-up"
        " under 2/9 of plain's time, 1.0 s here: it is 1.5 s."
    )
    del by[(START, WORKER_IMPORTS)]
    assert _start_up_floor(by, "CT 1000") == ""


def test_the_report_warns_when_plain_io_waited_on_the_disk():
    by = {("CT 1000", PLAIN): {**_row("CT 1000", PLAIN, 1000, 5.0), "cpu_s": 3.5}}
    assert _waiting(by, "CT 1000") == (
        "  - plain read+write on CT 1000 spent 30% of its wall time waiting, not computing"
        " (the disk was slow in this run): the wall ratios to it flatter every contender;"
        " compare the per-CPU-second ratios."
    )
    by[("CT 1000", PLAIN)]["cpu_s"] = 4.8  # 4 % off the CPU: nothing to say
    assert _waiting(by, "CT 1000") == ""
