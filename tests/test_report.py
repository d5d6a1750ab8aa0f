"""The arm report: counts equal the tables', plots per arm, visit status, blinding."""

import csv
import datetime as dt
from html.parser import HTMLParser

import pytest

from pipeline import batch, query
from pipeline.demo import upload_trial
from pipeline.report import _status, write_arm_report

AS_OF = dt.date(2026, 11, 25)


class _Page(HTMLParser):
    """Collects table cells by table id, figures, and every external reference."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.figures: list[dict[str, str]] = []
        self.external: list[str] = []
        self.scripts = 0
        self.svgs = 0
        self._table = None
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if attrs.get(key):
                self.external.append(attrs[key])
        if tag == "script":
            self.scripts += 1
        if tag == "svg":
            self.svgs += 1
        if tag == "figure":
            self.figures.append(attrs)
        if tag == "table":
            self._table = attrs["id"]
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self.tables[self._table].append([])
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(self._cell)
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


@pytest.fixture
def processed(enrolled, trial):
    for batch_id in upload_trial(enrolled, trial):
        for step in batch.TASKS:
            batch.run_task(step, batch_id, enrolled)
    return enrolled


def _page(path):
    page = _Page()
    page.feed(path.read_text())
    return page


def test_the_report_counts_equal_the_tables(processed, protocol):
    report = write_arm_report(processed, protocol, as_of=AS_OF)
    page = _page(report.html)
    header, *rows = page.tables["counts-table"]
    assert header == ["arm", "visit", "subjects", "studies", "series", "images"]
    truth = query.run(
        processed,
        "SELECT arm, visit, count(DISTINCT subject_id), count(DISTINCT study_uid),"
        " count(DISTINCT series_uid), count(*) FROM instances GROUP BY ALL",
    ).rows
    shown = {(r[0], r[1]): tuple(int(x) for x in r[2:]) for r in rows}
    assert {(a, v): tuple(n) for a, v, *n in truth} == {k: n for k, n in shown.items() if any(n)}
    assert len(rows) == len(protocol.arms) * len(protocol.visits)
    with report.counts_csv.open() as handle:
        assert [list(r.values()) for r in csv.DictReader(handle)] == rows


def test_the_report_is_one_self_contained_page_with_a_plot_per_parameter(processed, protocol):
    report = write_arm_report(processed, protocol, as_of=AS_OF)
    page = _page(report.html)
    assert page.external == [] and page.scripts == 0
    assert page.svgs == len(page.figures) == 7
    assert {f["data-parameter"] for f in page.figures} >= {"kvp", "magnetic_field_strength_t"}
    kvp = [r for r in page.tables["parameters-table"][1:] if r[1] == "kvp"]
    per_arm = dict(
        query.run(
            processed,
            "SELECT arm, count(*) FROM series WHERE modality = 'CT' AND kvp IS NOT NULL"
            " GROUP BY arm",
        ).rows
    )
    assert {r[2]: int(r[3]) for r in kvp} == per_arm


def test_visits_are_on_time_quarantined_missing_or_not_yet_due(processed, protocol, trial):
    report = write_arm_report(processed, protocol, as_of=AS_OF)
    with report.visits_csv.open() as handle:
        visits = {(r["subject_id"], r["visit"]): r["status"] for r in csv.DictReader(handle)}
    mixed = next(b for b in trial.batches if b.expect == "mixed_patients")
    assert visits[(mixed.subject_id, mixed.visit)] == "quarantined"
    assert visits[(trial.batches[0].subject_id, "BASELINE")] == "on_time"
    assert visits[(trial.batches[0].subject_id, "WEEK24")] == "missing"
    randomized = min(trial.randomization.values())
    early = write_arm_report(processed, protocol, as_of=randomized + dt.timedelta(days=10))
    with early.visits_csv.open() as handle:
        statuses = {r["status"] for r in csv.DictReader(handle) if r["visit"] == "WEEK24"}
    assert "not_due" in statuses


@pytest.mark.parametrize(
    ("day", "today", "refused", "status"),
    [
        (84, 200, False, "on_time"),
        (70, 200, False, "early"),
        (95, 200, False, "late"),
        (None, 200, True, "quarantined"),
        (None, 200, False, "missing"),
        (None, 88, False, "not_due"),
    ],
)
def test_a_visit_status_follows_the_protocol_window(day, today, refused, status):
    assert _status(84, 7, day, today, refused) == status


def test_the_blinded_report_shows_coded_groups_and_no_arm(processed, protocol):
    report = write_arm_report(processed, protocol, blinded=True, as_of=AS_OF)
    page = _page(report.html)
    groups = {r[0] for r in page.tables["counts-table"][1:]}
    assert groups == {"Group 1", "Group 2"}
    assert {r[1] for r in page.tables["visits-table"][1:]} == groups
    assert {r[2] for r in page.tables["parameters-table"][1:]} <= groups
    for path in (report.html, report.counts_csv, report.parameters_csv, report.visits_csv):
        text = path.read_text()
        for arm in protocol.arms:
            assert f">{arm}<" not in text and f",{arm}," not in text
    unblinded = write_arm_report(processed, protocol, as_of=AS_OF)
    assert {r[0] for r in _page(unblinded.html).tables["counts-table"][1:]} == set(protocol.arms)
