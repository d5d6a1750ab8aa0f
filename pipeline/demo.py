"""``trialpipe demo``: a synthetic multi-site trial, end to end, with a printed summary."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

from pipeline import enrollment, intake, ledger
from pipeline.embedded import run_ready_batches
from pipeline.home import DataHome
from pipeline.protocol import Protocol, load_protocol
from pipeline.report import write_arm_report
from pipeline.synth import SyntheticTrial, make_trial, make_wrong_patient_batch

PROTOCOL = "DEMO-01"


def run_demo(home: DataHome, subjects_per_site: int = 2) -> str:
    """Generate, enroll, upload, run (twice: a wrong-patient follow-up comes later) and
    summarise. The synthetic uploads are made outside the data home and removed after."""
    protocol = load_protocol(PROTOCOL)
    home.ensure()
    scratch = Path(tempfile.mkdtemp(prefix="trialpipe-demo-"))
    try:
        trial = make_trial(scratch, protocol, subjects_per_site=subjects_per_site)
        enrollment.import_csv(home, protocol, trial.enrollment_csv)
        upload_trial(home, trial)
        first = run_ready_batches(home)
        follow_up = make_wrong_patient_batch(
            scratch, protocol, trial, trial.batches[0].subject_id, protocol.visit_ids[-1]
        )
        intake.stage_batch(
            home,
            PROTOCOL,
            follow_up.site_id,
            follow_up.subject_id,
            follow_up.visit,
            [follow_up.folder],
            uploader="demo",
        )
        second = run_ready_batches(home)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report(home, protocol, {**first, **second})


def report(home: DataHome, protocol: Protocol, runs: dict[str, str]) -> str:
    """The demo's last step, once every batch ran (``runs``: ``{batch_id: DAG run state}``):
    write the arm report and its blinded twin, and return the summary to print."""
    arms = write_arm_report(home, protocol)
    blinded = write_arm_report(home, protocol, blinded=True)
    return summary(home, runs) + f"\narm report: {arms.html}\n   blinded: {blinded.html}"


def upload_trial(home: DataHome, trial: SyntheticTrial) -> dict[str, str]:
    """Stage every planned batch of a synthetic trial; return ``{batch_id: expected}``.

    The unenrolled subject's batch reaches the inbox as if by a drop folder, since the
    client would refuse it; the DAG must refuse it on its own.
    """
    staged = {}
    for planned in trial.batches:
        batch_id = intake.stage_batch(
            home,
            PROTOCOL,
            planned.site_id,
            planned.subject_id,
            planned.visit,
            [planned.folder],
            uploader="demo",
            check=planned.expect != "unenrolled_subject",
        )
        staged[batch_id] = planned.expect
    return staged


def summary(home: DataHome, runs: dict[str, str]) -> str:
    """What happened, for a data manager: batches, archive per arm, quarantine by reason,
    and one arm comparison computed with DuckDB from the Parquet tables."""
    from pipeline.query import format_table, run

    batches = ledger.batch_summaries(home)
    files = ledger.file_rows(home)
    states = Counter(b["state"] for b in batches)
    reasons = Counter(f["reason"] for f in files if f["disposition"] == "quarantined")
    lines = [
        f"trialpipe demo ({PROTOCOL}) in {home.root}",
        f"DAG runs: {len(runs)} ({Counter(runs.values())})",
        "batches: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items())),
        f"files uploaded: {len(files)}; archived "
        f"{sum(f['disposition'] == 'archived' for f in files)}, quarantined "
        f"{sum(f['disposition'] == 'quarantined' for f in files)}, duplicates "
        f"{sum(f['disposition'] == 'duplicate' for f in files)}",
        "quarantined by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())),
        f"archive: {home.archive / PROTOCOL}",
        f"tables: {home.parquet} (instances, series, batches, qc_findings)",
        f"QC reports (GX Data Docs): {home.reports / 'qc'}/<batch>/index.html",
        "",
        "arm comparison (trialpipe query over the instances table):",
    ]
    comparison = run(
        home,
        """
        SELECT arm, visit, count(DISTINCT subject_id) AS subjects,
               count(DISTINCT series_uid) AS series, count(*) AS images,
               round(avg(slice_thickness_mm) FILTER (modality = 'CT'), 2) AS ct_slice_mm,
               round(avg(kvp) FILTER (modality = 'CT'), 1) AS ct_kvp,
               round(avg(magnetic_field_strength_t) FILTER (modality = 'MR'), 2) AS mr_tesla
        FROM instances GROUP BY arm, visit ORDER BY arm, visit
        """,
    )
    lines.append(format_table(comparison))
    lines.append("status: trialpipe status   |   UI: trialpipe ui  (then http://127.0.0.1:8080/)")
    return "\n".join(lines)
