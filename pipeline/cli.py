"""``trialpipe``: the command line for site coordinators, data managers and statisticians.

Every command answers with a clear message and a nonzero exit on refusal, never a
traceback. Commands that process batches call the same functions as the Airflow DAG.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.home import DataHome, data_home
from pipeline.settings import SettingError

EXIT_REFUSED = 2


class Refused(Exception):
    """A command refused with a message for the person at the keyboard."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    home = data_home(args.home)
    try:
        return int(args.handler(home, args) or 0)
    except (Refused, SettingError) as refusal:
        print(f"trialpipe: {refusal}", file=sys.stderr)
        return EXIT_REFUSED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trialpipe", description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="data home (default: $TRIALPIPE_HOME or ~/trialpipe-home)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enroll = commands.add_parser("enroll", help="import the enrollment/randomization list")
    enroll.add_argument("--protocol", required=True)
    enroll.add_argument("csv", type=Path, metavar="CSV")
    enroll.set_defaults(handler=cmd_enroll)

    upload = commands.add_parser("upload", help="stage one batch (one subject, one visit)")
    _batch_identity(upload)
    upload.add_argument("--uploader", help="who uploads (default: the login name)")
    upload.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    upload.set_defaults(handler=cmd_upload)

    run = commands.add_parser("run", help="process every READY batch through the Airflow DAG")
    run.add_argument("--timeout", type=float, default=3600, help="seconds to wait (default 3600)")
    run.set_defaults(handler=cmd_run)

    status = commands.add_parser("status", help="one row per batch")
    status.add_argument("--json", action="store_true", help="print a JSON list")
    status.set_defaults(handler=cmd_status)

    deid = commands.add_parser("deid", help="de-identify a folder as a dry run (no archive)")
    _batch_identity(deid)
    deid.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    deid.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR")
    deid.set_defaults(handler=cmd_deid)

    demo = commands.add_parser("demo", help="run a synthetic multi-site trial end to end")
    demo.add_argument("--subjects-per-site", type=int, default=2)
    demo.set_defaults(handler=cmd_demo)

    recipe = commands.add_parser("recipe", help="check a protocol's definition and recipe")
    recipe_commands = recipe.add_subparsers(dest="recipe_command", required=True)
    recipe_check = recipe_commands.add_parser("check", help="validate protocol.yaml and recipe")
    recipe_check.add_argument("protocol", metavar="PROTOCOL")
    recipe_check.set_defaults(handler=cmd_recipe_check)

    crosswalk = commands.add_parser("crosswalk", help="the original-to-pseudonym crosswalk")
    crosswalk_commands = crosswalk.add_subparsers(dest="crosswalk_command", required=True)
    export = crosswalk_commands.add_parser(
        "export", help="write id_old,id_new CSV for a reviewer (holds original identifiers)"
    )
    export.add_argument("--protocol", required=True)
    export.add_argument("output", type=Path, metavar="CSV")
    export.set_defaults(handler=cmd_crosswalk_export)

    audit = commands.add_parser("audit", help="the audit trail of one batch, from the ledger")
    audit.add_argument("batch_id", metavar="BATCH")
    audit.add_argument("--json", action="store_true", help="print JSON")
    audit.set_defaults(handler=cmd_audit)

    held = commands.add_parser("quarantine", help="list or release quarantined files")
    held_commands = held.add_subparsers(dest="quarantine_command", required=True)
    held_list = held_commands.add_parser("list", help="every file now in quarantine")
    held_list.add_argument("--site", help="only this site's batches")
    held_list.add_argument("--json", action="store_true", help="print a JSON list")
    held_list.set_defaults(handler=cmd_quarantine_list)
    held_release = held_commands.add_parser(
        "release", help="re-queue quarantined files as a new batch (after a fix)"
    )
    held_release.add_argument(
        "target", metavar="BATCH|BATCH:N[,N]", help="a batch, or file numbers of a batch"
    )
    held_release.set_defaults(handler=cmd_quarantine_release)

    sql = commands.add_parser("query", help="run SQL (DuckDB) over the Parquet tables")
    sql.add_argument("sql", metavar="SQL", help="views: instances, series, batches, qc_findings")
    sql.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sql.set_defaults(handler=cmd_query)

    report = commands.add_parser("report", help="reports computed from the tables")
    report_commands = report.add_subparsers(dest="report_command", required=True)
    arms = report_commands.add_parser("arms", help="arm comparison: HTML page plus CSV")
    arms.add_argument("--protocol", help="protocol ID (default: the only one there is)")
    arms.add_argument("--blinded", action="store_true", help="arms as coded groups")
    arms.add_argument("--as-of", type=_date, help="date visits are judged at (default today)")
    arms.add_argument("--out", type=Path, help="folder (default reports/arms/<protocol>/)")
    arms.set_defaults(handler=cmd_report_arms)

    compact = commands.add_parser("compact", help="run the table compaction DAG once")
    compact.add_argument("--timeout", type=float, default=3600)
    compact.set_defaults(handler=cmd_compact)

    ui = commands.add_parser("ui", help="serve the Airflow UI of the embedded data home")
    ui.add_argument("--port", type=int, default=8080)
    ui.set_defaults(handler=cmd_ui)
    return parser


def _batch_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--protocol", required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--visit", required=True)


def _date(text: str):  # type: ignore[no-untyped-def]
    import datetime as dt

    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _protocol(protocol_id: str):  # type: ignore[no-untyped-def]
    from pipeline.protocol import ProtocolError, load_protocol

    try:
        return load_protocol(protocol_id)
    except ProtocolError as error:
        raise Refused(str(error)) from None


def cmd_enroll(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.enrollment import EnrollmentError, import_csv

    protocol = _protocol(args.protocol)
    home.ensure()
    try:
        result = import_csv(home, protocol, args.csv)
    except EnrollmentError as error:
        raise Refused(f"enrollment list refused, nothing imported: {error}") from None
    print(f"enrolled {result.added} new subject(s); {result.unchanged} already enrolled")
    return 0


def cmd_upload(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.intake import UploadRefused, stage_batch

    try:
        batch_id = stage_batch(
            home,
            args.protocol,
            args.site,
            args.subject,
            args.visit,
            args.paths,
            uploader=args.uploader,
        )
    except UploadRefused as error:
        raise Refused(f"upload refused: {error}") from None
    print(batch_id)
    return 0


def cmd_run(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.embedded import EmbeddedAirflowError, run_ready_batches

    try:
        outcome = run_ready_batches(home, timeout=args.timeout)
    except EmbeddedAirflowError as error:
        raise Refused(str(error)) from None
    for batch_id, state in outcome.items():
        print(f"{batch_id}: {state}")
    if not outcome:
        print("no READY batches")
    failed = [b for b, s in outcome.items() if s != "success"]
    if failed:
        print(f"{len(failed)} DAG run(s) did not succeed; see `trialpipe ui`", file=sys.stderr)
        return 1
    return 0


STATUS_COLUMNS = (
    "batch_id",
    "site_id",
    "subject_id",
    "visit",
    "state",
    "files",
    "archived",
    "quarantined",
    "duplicates",
)


def cmd_status(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline import ledger

    rows = [{c: row[c] for c in STATUS_COLUMNS} for row in ledger.batch_summaries(home)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(_table(rows, STATUS_COLUMNS))
    return 0


def _table(rows: list[dict], columns: tuple[str, ...]) -> str:
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def cmd_deid(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.dryrun import DryRunRefused, deidentify_folder

    try:
        report = deidentify_folder(
            home,
            args.protocol,
            args.site,
            args.subject,
            args.visit,
            args.input_dir,
            args.output_dir,
        )
    except DryRunRefused as error:
        raise Refused(str(error)) from None
    done = sum(1 for f in report["files"] if f["reason"] is None)
    print(f"de-identified {done} of {len(report['files'])} file(s) into {args.output_dir}")
    for item in report["files"]:
        if item["reason"]:
            print(f"  {item['path']}: {item['reason']} ({item['detail'] or ''})".rstrip(" ()"))
    print(f"report: {args.output_dir / 'deid-report.json'}")
    return 0


def cmd_demo(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    print(run_demo(home, subjects_per_site=args.subjects_per_site))
    return 0


def cmd_recipe_check(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.recipe_check import check

    problems = check(args.protocol)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.protocol}", file=sys.stderr)
        return 1
    print(f"{args.protocol}: protocol and recipe are valid")
    return 0


def cmd_crosswalk_export(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.restricted import export_crosswalk

    count = export_crosswalk(home, _protocol(args.protocol).protocol_id, args.output)
    print(
        f"wrote {count} id_old,id_new pair(s) to {args.output} (original identifiers: "
        "keep it inside the restricted side)"
    )
    return 0


def cmd_audit(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline import ledger

    trail = ledger.trail(home, args.batch_id)
    if trail is None:
        raise Refused(f"no batch {args.batch_id} in the ledger")
    if args.json:
        print(json.dumps(trail, indent=2, default=str))
        return 0
    batch = trail["batch"]
    print(
        f"batch {batch['batch_id']}  protocol {batch['protocol_id']}  site {batch['site_id']}"
        f"  subject {batch['subject_id'] or '-'}  visit {batch['visit'] or '-'}"
    )
    print(
        f"uploaded {_when(batch['uploaded_at'])} by {batch['uploader'] or '-'};"
        f" {batch['files']} file(s) in the manifest"
    )
    if batch["released_from"]:
        print(f"released from batch {batch['released_from']}")
    for other in trail["released_to"]:
        print(f"released to batch {other}")
    print("state changes:")
    for event in trail["events"]:
        extras = [
            f"{key} {event[key]}"
            for key in ("reason", "dag_run_id", "recipe_version", "code_version")
            if event[key]
        ]
        print(
            f"  {_when(event['at'])}  {event['state']:<11} {event['detail'] or ''}"
            + ("  [" + "; ".join(extras) + "]" if extras else "")
        )
    print("files (every event, oldest first):")
    for item in trail["files"]:
        parts = [
            f"  #{item['file_no']:<4} {_when(item['at'])}  {item['disposition']:<11}",
            f"in {item['sha256_in'] or '-'}",
        ]
        if item["reason"]:
            parts.append(f"reason {item['reason']}")
        if item["sha256_out"]:
            parts.append(f"out {item['sha256_out']}")
        if item["archive_path"]:
            parts.append(f"archive {item['archive_path']}")
        if item["detail"]:
            parts.append(f"({item['detail']})")
        if item["dag_run_id"]:
            parts.append(f"run {item['dag_run_id']}")
        print("  ".join(parts))
    return 0


def _when(value) -> str:  # type: ignore[no-untyped-def]
    return value.isoformat(timespec="seconds") if value else "-"


def cmd_quarantine_list(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.quarantine import listing

    rows = listing(home, args.site)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("nothing in quarantine")
        return 0
    columns = ("batch_id", "site_id", "subject_id", "visit", "file_no", "reason")
    print(_table([{c: r[c] if r[c] is not None else "-" for c in columns} for r in rows], columns))
    return 0


def cmd_quarantine_release(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.release import ReleaseRefused, parse_target, release

    try:
        batch_id, numbers = parse_target(args.target)
        new_id, count = release(home, batch_id, numbers)
    except ReleaseRefused as error:
        raise Refused(f"release refused: {error}") from None
    print(f"released {count} file(s) of {batch_id} as batch {new_id}")
    print("it is READY: `trialpipe run` processes it in a new DAG run")
    return 0


def cmd_query(home: DataHome, args: argparse.Namespace) -> int:
    import csv

    from pipeline.query import QueryError, format_table, run

    try:
        result = run(home, args.sql)
    except QueryError as error:
        raise Refused(f"query failed: {error}") from None
    if args.format == "json":
        print(
            json.dumps(
                [dict(zip(result.columns, r, strict=True)) for r in result.rows],
                indent=2,
                default=str,
            )
        )
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows(result.rows)
    else:
        print(format_table(result))
    return 0


def cmd_report_arms(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.protocol import known_protocols
    from pipeline.report import write_arm_report

    protocol_id = args.protocol
    if protocol_id is None:
        known = known_protocols()
        if len(known) != 1:
            raise Refused("several protocols: name one with --protocol " + ", ".join(known))
        protocol_id = known[0]
    report = write_arm_report(
        home, _protocol(protocol_id), blinded=args.blinded, as_of=args.as_of, out_dir=args.out
    )
    print(f"arm report: {report.html}")
    for path in (report.counts_csv, report.parameters_csv, report.visits_csv):
        print(f"       csv: {path}")
    return 0


def cmd_compact(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.embedded import EmbeddedAirflowError, run_compaction

    try:
        state = run_compaction(home, timeout=args.timeout)
    except EmbeddedAirflowError as error:
        raise Refused(str(error)) from None
    print(f"compaction DAG run: {state}")
    return 0 if state == "success" else 1


def cmd_ui(home: DataHome, args: argparse.Namespace) -> int:
    from pipeline.embedded import serve_ui

    return serve_ui(home, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
