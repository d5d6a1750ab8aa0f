"""``trialpipe report arms``: the arm comparison statisticians and core-lab reviewers read.

Computed with DuckDB from the Parquet tables (plus the randomization list, for subjects
with no images yet and for which visits are due): subjects, studies, series and images per
arm and visit; the distribution of key acquisition parameters per arm (one value per
series, so a 300-slice series weighs as much as a 3-slice one); and each subject's visits as
on time, early, late, quarantined, missing or not yet due.

Written as one self-contained HTML page (inline CSS and SVG: no script, no link out) and
CSV files beside it. ``blinded`` replaces each arm label by a coded group ("Group 1", ...)
whose order is keyed by the trial secret, so a blinded reviewer cannot tell the arms from
the codes; no arm label appears anywhere in a blinded report.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from pipeline import atomic, enrollment, plots, query
from pipeline.home import DataHome
from pipeline.protocol import Protocol
from pipeline.pseudonyms import keyed_digest, trial_secret

# (modality, column, label, unit): the parameters whose spread the report plots per arm.
PARAMETERS = (
    ("CT", "slice_thickness_mm", "CT slice thickness", "mm"),
    ("CT", "kvp", "CT tube voltage", "kV"),
    ("CT", "pixel_spacing_row_mm", "CT pixel spacing", "mm"),
    ("MR", "magnetic_field_strength_t", "MR field strength", "T"),
    ("MR", "slice_thickness_mm", "MR slice thickness", "mm"),
    ("MR", "repetition_time_ms", "MR repetition time", "ms"),
    ("MR", "echo_time_ms", "MR echo time", "ms"),
)
COUNT_COLUMNS = ("arm", "visit", "subjects", "studies", "series", "images")
PARAMETER_COLUMNS = ("modality", "parameter", "arm", "n", "min", "q1", "median", "q3", "max")
VISIT_COLUMNS = ("subject_id", "arm", "visit", "target_day", "window_days", "study_day", "status")


@dataclass(frozen=True)
class ArmReport:
    """Where the report was written."""

    html: Path
    counts_csv: Path
    parameters_csv: Path
    visits_csv: Path


def arm_labels(home: DataHome, protocol: Protocol, blinded: bool) -> dict[str, str]:
    """Arm -> label shown; blinded: coded groups in an order keyed by the trial secret."""
    if not blinded:
        return {arm: arm for arm in protocol.arms}
    key = trial_secret(home, protocol.protocol_id)
    order = sorted(protocol.arms, key=lambda arm: keyed_digest(key, "blinding", arm))
    return {arm: f"Group {n}" for n, arm in enumerate(order, start=1)}


def counts(con: Any, protocol: Protocol) -> list[dict[str, Any]]:
    """Subjects, studies, series and images per arm and visit (every arm x visit)."""
    found = {
        (arm, visit): (subjects, studies, series, images)
        for arm, visit, subjects, studies, series, images in con.execute(
            """
            SELECT arm, visit, count(DISTINCT subject_id), count(DISTINCT study_uid),
                   count(DISTINCT series_uid), count(*)
            FROM instances WHERE protocol = ? GROUP BY arm, visit
            """,
            [protocol.protocol_id],
        ).fetchall()
    }
    return [
        dict(zip(COUNT_COLUMNS, (arm, visit, *found.get((arm, visit), (0, 0, 0, 0))), strict=True))
        for arm in protocol.arms
        for visit in protocol.visit_ids
    ]


def parameters(con: Any, protocol: Protocol) -> dict[tuple[str, str], dict[str, list[float]]]:
    """Per (modality, column): each arm's series values."""
    result: dict[tuple[str, str], dict[str, list[float]]] = {}
    for modality, column, _, _ in PARAMETERS:
        values: dict[str, list[float]] = {arm: [] for arm in protocol.arms}
        for arm, value in con.execute(
            f"SELECT arm, {column} FROM series WHERE protocol = ? AND modality = ?"
            f" AND {column} IS NOT NULL ORDER BY arm, {column}",
            [protocol.protocol_id, modality],
        ).fetchall():
            values.setdefault(arm, []).append(float(value))
        result[(modality, column)] = values
    return result


def visits(home: DataHome, con: Any, protocol: Protocol, as_of: dt.date) -> list[dict[str, Any]]:
    """Each enrolled subject's protocol visits with the observed study day and a status."""
    observed = {
        (subject, visit): day
        for subject, visit, day in con.execute(
            "SELECT subject_id, visit, min(study_day) FROM instances WHERE protocol = ?"
            " GROUP BY subject_id, visit",
            [protocol.protocol_id],
        ).fetchall()
    }
    refused = {
        (subject, visit)
        for subject, visit in con.execute(
            "SELECT subject_id, visit FROM batches WHERE protocol = ? AND subject_id IS NOT NULL"
            " GROUP BY subject_id, visit HAVING sum(archived) = 0",
            [protocol.protocol_id],
        ).fetchall()
    }
    rows = []
    for subject in enrollment.enrolled(home, protocol.protocol_id):
        # Days since randomization today; the randomization date itself never leaves.
        today = (as_of - subject.randomization_date).days
        for visit in protocol.visits:
            day = observed.get((subject.subject_id, visit.visit_id))
            rows.append(
                {
                    "subject_id": subject.subject_id,
                    "arm": subject.arm,
                    "visit": visit.visit_id,
                    "target_day": visit.day,
                    "window_days": visit.window_days,
                    "study_day": day,
                    "status": _status(
                        visit.day,
                        visit.window_days,
                        day,
                        today,
                        (subject.subject_id, visit.visit_id) in refused,
                    ),
                }
            )
    return rows


def _status(target: int, window: int, day: int | None, today: int, refused: bool) -> str:
    if day is not None:
        if day < target - window:
            return "early"
        return "late" if day > target + window else "on_time"
    if refused:
        return "quarantined"
    return "missing" if today > target + window else "not_due"


def write_arm_report(
    home: DataHome,
    protocol: Protocol,
    blinded: bool = False,
    as_of: dt.date | None = None,
    out_dir: Path | None = None,
) -> ArmReport:
    """Compute the arm comparison and write it as HTML plus CSV files."""
    as_of = as_of or dt.datetime.now(dt.UTC).date()
    labels = arm_labels(home, protocol, blinded)
    with query.connect(home) as con:
        count_rows = counts(con, protocol)
        values = parameters(con, protocol)
        visit_rows = visits(home, con, protocol, as_of)
    for row in count_rows + visit_rows:
        row["arm"] = labels.get(row["arm"], row["arm"])
    # Blinded rows are ordered by group, so table order does not give the arms away either.
    count_rows.sort(key=lambda r: (r["arm"], protocol.visit_ids.index(r["visit"])))
    visit_rows.sort(key=lambda r: (r["subject_id"], protocol.visit_ids.index(r["visit"])))
    parameter_rows = []
    for modality, column, _, _ in PARAMETERS:
        for arm in sorted(values[(modality, column)], key=lambda a: labels.get(a, a)):
            series_values = values[(modality, column)][arm]
            parameter_rows.append(_summary(modality, column, labels.get(arm, arm), series_values))
    folder = out_dir or home.reports / "arms" / protocol.protocol_id
    stem = "arms-blinded" if blinded else "arms"
    report = ArmReport(
        folder / f"{stem}.html",
        folder / f"{stem}-counts.csv",
        folder / f"{stem}-parameters.csv",
        folder / f"{stem}-visits.csv",
    )
    atomic.write_bytes(report.counts_csv, _csv(COUNT_COLUMNS, count_rows))
    atomic.write_bytes(report.parameters_csv, _csv(PARAMETER_COLUMNS, parameter_rows))
    atomic.write_bytes(report.visits_csv, _csv(VISIT_COLUMNS, visit_rows))
    html = _html(protocol, blinded, as_of, labels, count_rows, values, parameter_rows, visit_rows)
    atomic.write_bytes(report.html, html.encode())
    return report


def _summary(modality: str, column: str, arm: str, values: list[float]) -> dict[str, Any]:
    v = sorted(values)
    stats: dict[str, Any] = {"modality": modality, "parameter": column, "arm": arm, "n": len(v)}
    for name, q in (("min", 0.0), ("q1", 0.25), ("median", 0.5), ("q3", 0.75), ("max", 1.0)):
        stats[name] = round(plots.quantile(v, q), 6) if v else None
    return stats


def _csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: row.get(c) for c in columns} for row in rows)
    return buffer.getvalue().encode()


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:72rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}th,td{border:1px solid #ccc;
padding:.25rem .6rem;text-align:right}th{background:#f0f3f7}td:first-child,th:first-child
{text-align:left}figure{margin:1rem 0}figcaption{font-weight:600}.meta{color:#555}
.status-missing,.status-late,.status-quarantined{background:#fde2e1}.status-early{background:#fff4d6}
"""


def _table(table_id: str, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        status = row.get("status")
        css = f' class="status-{escape(str(status))}"' if status else ""
        cells = "".join(f"<td>{escape(_cell(row.get(c)))}</td>" for c in columns)
        body.append(f"<tr{css}>{cells}</tr>")
    return (
        f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _html(
    protocol: Protocol,
    blinded: bool,
    as_of: dt.date,
    labels: dict[str, str],
    count_rows: list[dict[str, Any]],
    values: dict[tuple[str, str], dict[str, list[float]]],
    parameter_rows: list[dict[str, Any]],
    visit_rows: list[dict[str, Any]],
) -> str:
    figures = []
    for modality, column, label, unit in PARAMETERS:
        groups = {
            labels.get(arm, arm): series_values
            for arm, series_values in sorted(
                values[(modality, column)].items(), key=lambda item: labels.get(item[0], item[0])
            )
        }
        figures.append(
            f'<figure data-modality="{modality}" data-parameter="{column}">'
            f"<figcaption>{escape(label)} ({escape(unit)}), one value per series</figcaption>"
            f"{plots.box_plot(label, groups, unit)}</figure>"
        )
    statuses: dict[str, int] = {}
    for row in visit_rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    title = f"Arm comparison: {protocol.protocol_id}" + (" (blinded)" if blinded else "")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>"
        f'<p class="meta">{escape(protocol.name)}. Visits as of {as_of.isoformat()}. '
        + (
            "Arms are shown as coded groups for blinded review. "
            if blinded
            else "Arms as randomized. "
        )
        + "Counts are of archived, de-identified images; quarantined files are not counted.</p>"
        '<section id="counts"><h2>Subjects, studies, series and images per arm and visit</h2>'
        + _table("counts-table", COUNT_COLUMNS, count_rows)
        + '</section><section id="parameters"><h2>Acquisition parameters per arm</h2>'
        + "".join(figures)
        + _table("parameters-table", PARAMETER_COLUMNS, parameter_rows)
        + '</section><section id="visits"><h2>Visits per subject</h2><p class="meta">'
        + ", ".join(f"{escape(k)}: {n}" for k, n in sorted(statuses.items()))
        + ". Each visit is on time within its window around the target day; missing once the"
        " window has passed with no archived images; quarantined when its upload was refused.</p>"
        + _table("visits-table", VISIT_COLUMNS, visit_rows)
        + "</section></body></html>\n"
    )
