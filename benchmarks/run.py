"""``make bench``: every contender on the same files in one run, ratios to plain I/O.

    python -m benchmarks.run [--ct 1000] [--mr 300] [--small 500] [--dag-files 2000]
                             [--work DIR] [--out docs/benchmarks.md]

Contenders, each in its own process (start-up included), on each corpus:
plain pydicom read+write (the floor); deid's replace_identifiers with the protocol's own
composed recipe, one file at a time (naive use); dicognito; ``trialpipe deid`` on the folder;
trialpipe's library pipeline (every ingest task in one process). Then, on a batch of
``--dag-files`` CT slices, the library pipeline again and the full Airflow DAG
(``trialpipe run`` on the embedded default). Beside them, two processes that only import
what trialpipe's tasks import (all of it; what each worker needs), on no file: the start-up
floor. Reports files/s, MB/s, CPU seconds, peak RSS and each ratio to plain read+write,
measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.corpus import Corpus, generate

PYTHON = sys.executable
TRIALPIPE = str(Path(sys.executable).parent / "trialpipe")


def _measure(command: list[str], env: dict[str, str] | None = None) -> dict:
    result = subprocess.run(
        [PYTHON, "-m", "benchmarks.measure", "--", *command],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=True,
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["returncode"] != 0:
        raise RuntimeError(f"{command[:4]} failed: {measured['stderr']}")
    return measured


def _subset(source: Path, target: Path, count: int) -> Path:
    """The first ``count`` files of ``source``, hard-linked (same bytes, no copy cost)."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.dcm"))[:count]:
        os.link(path, target / path.name)
    return target


def _home(work: Path, name: str, corpus: Corpus) -> Path:
    home = _fresh(work / "homes" / name)
    subprocess.run(
        [
            TRIALPIPE,
            "--home",
            str(home),
            "enroll",
            "--protocol",
            "DEMO-01",
            str(corpus.enrollment_csv),
        ],
        check=True,
        capture_output=True,
    )
    return home


def _upload(home: Path, corpus: Corpus, folder: Path) -> str:
    out = subprocess.run(
        [
            TRIALPIPE,
            "--home",
            str(home),
            "upload",
            *_batch_args(corpus),
            str(folder),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def _batch_args(corpus: Corpus) -> list[str]:
    """The options naming the corpus's batch: protocol, site, subject and visit."""
    return [
        "--protocol",
        "DEMO-01",
        "--site",
        corpus.site_id,
        "--subject",
        corpus.subject_id,
        "--visit",
        corpus.visit,
    ]


def _composed_recipe(work: Path) -> Path:
    from pipeline.protocol import load_protocol
    from pipeline.recipe import compose

    composed = compose(load_protocol("DEMO-01").recipe_files).path
    return Path(shutil.copy(composed, work / "composed.dicom"))


@dataclass(frozen=True)
class Run:
    """One contender on one corpus: ``prepare`` readies a fresh output (a new home with
    the batch uploaded, an empty output folder) and returns the command to measure."""

    corpus: str
    contender: str
    prepare: Callable[[], list[str]]
    env: dict[str, str] | None = None


def _fresh(folder: Path) -> Path:
    # Every measured run writes new files: overwriting the last round's would add the
    # cost of freeing their blocks to whoever ran second.
    shutil.rmtree(folder, ignore_errors=True)
    return folder


PLAIN = "plain pydicom read+write"


CONTENDER = [PYTHON, "-m", "benchmarks.contenders"]


def _start_up_runs() -> list[Run]:
    """The two import-only processes, on no file (see :data:`START`)."""
    imports = [*CONTENDER, "imports"]
    return [
        Run(START, IMPORTS, lambda: imports),
        Run(START, WORKER_IMPORTS, lambda: [*imports, "workers"]),
    ]


def _contenders(work: Path, corpus: Corpus, label: str, folder: Path, recipe: Path) -> list[Run]:
    out = work / "out" / label
    runs = [
        Run(
            label,
            PLAIN,
            lambda: [*CONTENDER, "plain", str(folder), str(_fresh(out / "plain"))],
        ),
        Run(
            label,
            "deid replace_identifiers (naive)",
            lambda: [*CONTENDER, "deid", str(folder), str(_fresh(out / "deid")), str(recipe)],
        ),
        Run(
            label,
            "dicognito",
            lambda: [*CONTENDER, "dicognito", str(folder), str(_fresh(out / "dicognito"))],
        ),
    ]
    for processes in (1, 2):
        plural = "es" if processes > 1 else ""

        def dry_run(processes: int = processes) -> list[str]:
            home = _home(work, f"deid-{label}-{processes}", corpus)
            return [
                TRIALPIPE,
                "--home",
                str(home),
                "deid",
                *_batch_args(corpus),
                str(folder),
                str(_fresh(out / f"trialpipe-{processes}")),
            ]

        def library(processes: int = processes) -> list[str]:
            home = _home(work, f"library-{label}-{processes}", corpus)
            return [*CONTENDER, "library", str(home), _upload(home, corpus, folder)]

        workers = {"TRIALPIPE_WORKERS": str(processes)}
        runs.append(Run(label, f"trialpipe deid ({processes} process{plural})", dry_run, workers))
        runs.append(
            Run(
                label, f"trialpipe library pipeline ({processes} process{plural})", library, workers
            )
        )
    return runs


def _measure_runs(runs: list[Run], repeat: int) -> list[dict]:
    """Each run ``repeat`` times, round by round (so a slow spell of the machine falls on
    every contender alike); each row holds the median of its rounds."""
    rounds: dict[int, list[dict]] = {n: [] for n in range(len(runs))}
    for round_number in range(repeat):
        for n, run in enumerate(runs):
            print(
                f"  round {round_number + 1}/{repeat} {run.corpus}: {run.contender}",
                file=sys.stderr,
                flush=True,
            )
            rounds[n].append(_measure(run.prepare(), run.env))
    rows = []
    for n, run in enumerate(runs):
        measured = rounds[n]
        rows.append(
            {
                "corpus": run.corpus,
                "contender": run.contender,
                **{
                    key: statistics.median(m[key] for m in measured)
                    for key in ("wall_s", "cpu_s", "peak_rss_mb")
                },
                "rounds": [{k: m[k] for k in ("wall_s", "cpu_s")} for m in measured],
            }
        )
    return rows


def _dag(work: Path, corpus: Corpus, folder: Path, label: str, repeat: int) -> list[dict]:
    rows = []
    library_rounds, dag_rounds = [], []
    for round_number in range(repeat):
        print(f"  round {round_number + 1}/{repeat} {label}: library pipeline", file=sys.stderr)
        home = _home(work, f"library-{label}", corpus)
        batch_id = _upload(home, corpus, folder)
        library_rounds.append(
            _measure(
                [PYTHON, "-m", "benchmarks.contenders", "library", str(home), batch_id],
                {"TRIALPIPE_WORKERS": "2"},
            )
        )
        print(f"  round {round_number + 1}/{repeat} {label}: Airflow DAG", file=sys.stderr)
        home = _home(work, f"dag-{label}", corpus)
        _upload(home, corpus, folder)
        measured = _measure([TRIALPIPE, "--home", str(home), "run", "--timeout", "7200"])
        dag_rounds.append({**measured, "dag_run_s": _dag_run_s(home)})
    for contender, measured in ((LIBRARY, library_rounds), (DAG, dag_rounds)):
        keys = ("wall_s", "cpu_s", "peak_rss_mb") + (("dag_run_s",) if contender == DAG else ())
        rows.append(
            {
                "corpus": label,
                "contender": contender,
                **{key: statistics.median(m[key] for m in measured) for key in keys},
                "rounds": [{k: m[k] for k in ("wall_s", "cpu_s")} for m in measured],
            }
        )
    return rows


ONE = "CT 1"
# No file at all: the imports trialpipe's tasks need, the start-up no batch can avoid.
START = "start-up"
IMPORTS = "trialpipe's imports (pydicom, deid, Great Expectations, pandas)"
WORKER_IMPORTS = "trialpipe's imports a worker needs (pydicom, deid)"
LIBRARY = "trialpipe library pipeline (2 processes)"
DAG = "trialpipe run (Airflow DAG, embedded)"


def _dag_run_s(home: Path) -> float:
    """The ingest DAG run's own duration, from Airflow's record (start to end of the run):
    the DAG's cost without starting and stopping the embedded Airflow around it."""
    import sqlite3

    with sqlite3.connect(home / "airflow" / "airflow.db") as db:
        started, ended = db.execute(
            "SELECT julianday(start_date), julianday(end_date) FROM dag_run"
            " WHERE dag_id = 'trialpipe_ingest'"
        ).fetchone()
    return (ended - started) * 86400


def _machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    return (
        f"{model}, {os.cpu_count()} cores, {memory} RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}"
    )


def _ratios(rows: list[dict], sizes: dict[str, tuple[int, float]]) -> None:
    floors = {r["corpus"]: r for r in rows if r["contender"] == PLAIN}
    for row in rows:
        files, megabytes = sizes[row["corpus"]]
        row["files"], row["mb"] = files, megabytes
        row["files_per_s"] = files / row["wall_s"]
        row["mb_per_s"] = megabytes / row["wall_s"]
        floor = floors.get(row["corpus"])
        if floor:
            row["x_plain"] = floor["wall_s"] / row["wall_s"]
            row["x_plain_per_cpu"] = floor["cpu_s"] / row["cpu_s"]


def _table(rows: list[dict]) -> str:
    lines = [
        "| corpus | contender | files | MB | wall s | CPU s | files/s | MB/s | peak RSS MB "
        "| × plain (wall) | × plain (per CPU s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['x_plain']:.2f}" if "x_plain" in r else "—"
        per_cpu = f"{r['x_plain_per_cpu']:.2f}" if "x_plain_per_cpu" in r else "—"
        lines.append(
            f"| {r['corpus']} | {r['contender']} | {r['files']} | {r['mb']:.0f} | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['files_per_s']:.1f} | "
            f"{r['mb_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {ratio} | {per_cpu} |"
        )
    return "\n".join(lines)


def _size(folder: Path) -> tuple[int, float]:
    files = sorted(folder.glob("*.dcm"))
    return len(files), sum(f.stat().st_size for f in files) / 1e6


def run(args: argparse.Namespace) -> list[dict]:
    work = Path(args.work or tempfile.mkdtemp(prefix="trialpipe-bench-"))
    print(f"generating the corpus under {work}", file=sys.stderr, flush=True)
    corpus = generate(work / "corpus", max(args.ct, args.dag_files), args.mr, args.small)
    recipe = _composed_recipe(work)
    rows: list[dict] = []
    sizes: dict[str, tuple[int, float]] = {}
    folders = {f"CT {args.ct}": _subset(corpus.folder("ct"), work / "sets" / "ct", args.ct)}
    # One slice: what every contender costs before its first file (start-up, and
    # trialpipe's per-batch work), so the report can split fixed cost from per-file cost.
    folders[ONE] = _subset(corpus.folder("ct"), work / "sets" / "one", 1)
    if args.mr:
        folders[f"MR {args.mr}"] = corpus.folder("mr")
    if args.small:
        folders[f"headers {args.small}"] = corpus.folder("small")
    runs: list[Run] = []
    for label, folder in folders.items():
        sizes[label] = _size(folder)
        runs += _contenders(work, corpus, label, folder, recipe)
    sizes[START] = (0, 0.0)
    runs += _start_up_runs()
    rows += _measure_runs(runs, args.repeat)
    if args.dag_files:
        label = f"CT batch {args.dag_files}"
        folder = _subset(corpus.folder("ct"), work / "sets" / "dag", args.dag_files)
        sizes[label] = _size(folder)
        rows += _dag(work, corpus, folder, label, args.repeat)
    _ratios(rows, sizes)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _fixed_and_per_file(by: dict[tuple[str, str], dict], corpus: str, tool: str) -> str:
    """The tool's cost split, from its runs on one slice: the fixed part (start-up and
    per-batch work) and the cost of each further file, on 1 process and on 2, against
    plain read+write's."""

    def per_file(contender: str) -> tuple[float, float] | None:
        run, one = by.get((corpus, contender)), by.get((ONE, contender))
        if not run or not one or run["files"] < 2:
            return None
        return one["wall_s"], 1000 * (run["wall_s"] - one["wall_s"]) / (run["files"] - 1)

    plain, single, double = (
        per_file(PLAIN),
        per_file(f"{tool} (1 process)"),
        per_file(f"{tool} (2 processes)"),
    )
    if not plain or not single or not double:
        return ""
    if min(plain[1], single[1], double[1]) <= 0:
        return "  - once started: too few files to tell the per-file cost from the fixed cost."
    return (
        f"  - once started: {single[0]:.1f} s before the first file is done (plain: "
        f"{plain[0]:.1f} s), then {single[1]:.1f} ms a file in one process (plain: "
        f"{plain[1]:.1f} ms), {plain[1] / single[1]:.2f}× plain per file; "
        f"{double[1]:.1f} ms a file on 2 processes, {single[1] / double[1]:.2f}× faster."
    )


def _start_up_floor(by: dict[tuple[str, str], dict], corpus: str) -> str:
    """What the imports alone allow on ``corpus``: the best 1-process ratio were every file
    then as cheap as plain's, and the bound both targets together put on the start-up.

    With ``S`` the workers' imports (serial: each process needs them, so two processes do
    them no faster than one) and ``W`` all other work, one process takes ``S + W`` and
    two at best ``S + W/2``; a speed-up of 1.8 needs ``W >= 8 S``, so ``S + W >= 9 S``,
    and 0.5x plain needs ``S + W <= 2 T`` (``T``: plain's time): so ``S <= 2 T / 9``.
    """
    plain, one = by.get((corpus, PLAIN)), by.get((ONE, PLAIN))
    every, workers = by.get((START, IMPORTS)), by.get((START, WORKER_IMPORTS))
    if not plain or not one or not every or not workers:
        return ""
    files_s = max(plain["wall_s"] - one["wall_s"], 0.0)  # plain's files, its start-up apart
    best = plain["wall_s"] / (every["wall_s"] + files_s)
    bound = 2 * plain["wall_s"] / 9
    return (
        f"  - start-up floor: trialpipe's imports alone take {every['wall_s']:.1f} s "
        f"({workers['wall_s']:.1f} s of them what every worker needs); were every file "
        f"then as cheap as plain's ({files_s:.1f} s for all), the 1-process ratio would be "
        f"{best:.2f}×. Both targets together need the workers' start-up under 2/9 of "
        f"plain's time, {bound:.1f} s here: it is {workers['wall_s']:.1f} s."
    )


def _waiting(by: dict[tuple[str, str], dict], corpus: str) -> str:
    """A warning when plain read+write spent a tenth or more of its wall time off the CPU
    (waiting on the disk): then every wall ratio to it is kinder than the work is, and the
    per-CPU-second ratios are the steadier comparison."""
    plain = by.get((corpus, PLAIN))
    if not plain or plain["wall_s"] <= 0:
        return ""
    waiting = 1 - plain["cpu_s"] / plain["wall_s"]
    if waiting < 0.1:
        return ""
    return (
        f"  - plain read+write on {corpus} spent {waiting:.0%} of its wall time waiting, "
        "not computing (the disk was slow in this run): the wall ratios to it flatter "
        "every contender; compare the per-CPU-second ratios."
    )


def report(rows: list[dict], command: str) -> str:
    """docs/benchmarks.md: the table, the machine and the targets' status."""
    by = {(r["corpus"], r["contender"]): r for r in rows}
    rounds = max((len(r.get("rounds", [])) for r in rows), default=1)
    notes = []
    for corpus in sorted({r["corpus"] for r in rows}):
        if not corpus.startswith("CT ") or corpus.startswith("CT batch") or corpus == ONE:
            continue
        for tool in ("trialpipe deid", "trialpipe library pipeline"):
            one, two = (
                by.get((corpus, f"{tool} (1 process)")),
                by.get((corpus, f"{tool} (2 processes)")),
            )
            if not one or not two:
                continue
            notes.append(
                f"- {tool} on {corpus}: {one['x_plain']:.2f}× plain read+write in one process "
                f"(per core; {one['x_plain_per_cpu']:.2f}× per CPU second), target ≥ 0.5×; "
                f"{one['wall_s'] / two['wall_s']:.2f}× faster on 2 processes than on 1 "
                "(target ≥ 1.8×)."
            )
            split = _fixed_and_per_file(by, corpus, tool)
            if split:
                notes.append(split)
        for line in (_start_up_floor(by, corpus), _waiting(by, corpus)):
            if line:
                notes.append(line)
    dag = {r["contender"]: r for r in rows if r["corpus"].startswith("CT batch")}
    if LIBRARY in dag and DAG in dag:
        library, airflow = dag[LIBRARY], dag[DAG]
        notes.append(
            f"- Airflow DAG on {airflow['corpus']}: the DAG run took "
            f"{airflow['dag_run_s']:.1f} s, {airflow['dag_run_s'] / library['wall_s']:.2f}× "
            f"the library pipeline's {library['wall_s']:.1f} s (target ≤ 1.3×); "
            f"`trialpipe run` with starting and stopping the embedded Airflow around it: "
            f"{airflow['wall_s']:.1f} s ({airflow['wall_s'] / library['wall_s']:.2f}×)."
        )
    peaks = [
        (r["corpus"], r["peak_rss_mb"])
        for r in rows
        if r["contender"] == LIBRARY and r["corpus"].startswith("CT")
    ]
    if len(peaks) > 1:
        notes.append(
            "- Peak memory of the library pipeline (largest process): "
            + ", ".join(f"{mb:.0f} MB on {corpus}" for corpus, mb in peaks)
            + " (target: bounded, independent of batch size)."
        )
    return (
        "# Benchmarks\n\n"
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC by `{command}` on: "
        f"{_machine()}.\n\n"
        "Every contender ran in its own process (start-up included) on the same files, in "
        f"one run of {rounds} rounds taken round by round (each figure is the median of its "
        "rounds, each round writing new files); ratios are to plain pydicom read+write of "
        "the same corpus (higher is "
        'faster; 1.00 = as fast as plain I/O). "Per CPU s" divides by CPU time instead '
        "of wall time. trialpipe runs with `TRIALPIPE_WORKERS` set to 1 and to 2 processes; "
        "the 1-process ratio is its per-core throughput. Peak RSS is the largest single "
        f"process. The {ONE} rows (one slice) measure what each contender costs before "
        "its first file is done (start-up, and trialpipe's per-batch work); the targets "
        "below split each CT ratio into that fixed cost and the cost of each further "
        f"file. The {START} rows process no file: they only import what trialpipe's tasks "
        "import, the start-up no batch can avoid.\n\n"
        + _table(rows)
        + "\n\n## Against the targets\n\n"
        + "\n".join(notes)
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=int, default=1000)
    parser.add_argument("--mr", type=int, default=300)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--dag-files", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians reported")
    parser.add_argument("--work", help="working folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    parser.add_argument("--out", type=Path, help="write the Markdown report here")
    parser.add_argument("--json", type=Path, help="write the raw measurements here")
    args = parser.parse_args()
    rows = run(args)
    text = report(rows, "make bench" if args.out else "python -m benchmarks.run")
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
