"""`make bench` works end to end: every contender runs on the same files and the report
carries a ratio for each. (Speed itself is measured by `make bench`, never asserted here.)"""

import json
import subprocess
import sys

from benchmarks.run import report


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
    for corpus in ("CT 4", "MR 2"):
        assert {r["contender"] for r in rows if r["corpus"] == corpus} == contenders
    for row in rows:
        assert row["files"] == int(row["corpus"].split()[-1]) and row["x_plain"] > 0
        assert len(row["rounds"]) == 2
    for name in ("plain", "deid", "dicognito", "trialpipe-1", "trialpipe-2"):
        written = list((work / "out" / "CT 4" / name).glob("*.dcm"))
        assert len(written) == 4, name
    text = out.read_text()
    assert "| CT 4 | trialpipe library pipeline (1 process) | 4 |" in text and "cores" in text
    assert report(rows, "x").count("target ≥ 0.5×") == 2
    assert report(rows, "x").count("target ≥ 1.8×") == 2
