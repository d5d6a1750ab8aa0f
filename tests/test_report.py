"""The arm report: counts equal the uploads', plots per arm, visit status, blinding, and a
page that is well formed, self-contained and renders in a browser as written."""

import csv
import datetime as dt
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from html.parser import HTMLParser

import pytest
from pydicom import dcmread

from pipeline import batch, enrollment, ledger
from pipeline.demo import upload_trial
from pipeline.home import data_home
from pipeline.report import _status, arm_labels, write_arm_report
from pipeline.synth import make_trial
from tests.conftest import SMALL

AS_OF = dt.date(2026, 11, 25)
# Elements an HTML page has no end tag for.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
# Elements and attributes through which a page loads something from elsewhere.
LOADING_TAGS = {"script", "link", "iframe", "frame", "object", "embed", "img", "base", "audio"}
LOADING_ATTRIBUTES = {"src", "href", "xlink:href", "srcset", "action", "formaction", "data"}
# The report's plots: (modality, column) -> the DICOM attribute the values come from.
PLOTTED = {
    ("CT", "slice_thickness_mm"): "SliceThickness",
    ("CT", "kvp"): "KVP",
    ("CT", "pixel_spacing_row_mm"): "PixelSpacing",
    ("MR", "magnetic_field_strength_t"): "MagneticFieldStrength",
    ("MR", "slice_thickness_mm"): "SliceThickness",
    ("MR", "repetition_time_ms"): "RepetitionTime",
    ("MR", "echo_time_ms"): "EchoTime",
}


class _Page(HTMLParser):
    """Reads a page strictly: every element closed in order, and collects table cells by
    table id, each figure's plotted marks per group, every text and attribute value, and
    anything that would load from elsewhere."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[str]]] = {}
        self.figures: list[dict] = []
        self.tags: Counter = Counter()
        self.strings: list[str] = []
        self.loads: list[str] = []
        self.problems: list[str] = []
        self.doctypes = 0
        self._open: list[str] = []
        self._table = None
        self._cell = None
        self._group = None

    def handle_decl(self, decl):
        self.doctypes += decl.lower() == "doctype html"

    def handle_starttag(self, tag, attrs):
        self._element(tag, attrs)
        if tag not in VOID:
            self._open.append(tag)

    def handle_startendtag(self, tag, attrs):  # <circle .../>: an element closed at once
        self._element(tag, attrs)
        self._close(tag)

    def _element(self, tag, attrs):
        attrs = dict(attrs)
        self.tags[tag] += 1
        self.strings += [v for v in attrs.values() if v]
        self.loads += [f"{tag} {k}" for k in attrs if k in LOADING_ATTRIBUTES]
        self.loads += [f"{tag} style" for v in attrs.values() if v and "url(" in v]
        if tag in LOADING_TAGS:
            self.loads.append(tag)
        if tag == "figure":
            self.figures.append({"attrs": attrs, "groups": {}})
        if tag == "g" and self.figures:
            self._group = self.figures[-1]["groups"].setdefault(attrs["data-group"], Counter())
        if self._group is not None:
            self._group[tag] += 1
        if tag == "table":
            self._table = attrs["id"]
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self.tables[self._table].append([])
        if tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in VOID:
            self.problems.append(f"</{tag}> for a void element")
            return
        expected = self._open.pop() if self._open else None
        if expected != tag:
            self.problems.append(f"</{tag}> closes <{expected}>")
        self._close(tag)

    def _close(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append(self._cell)
            self._cell = None
        if tag == "table":
            self._table = None
        if tag == "g":
            self._group = None

    def handle_data(self, data):
        self.strings.append(data)
        if self._open and self._open[-1] == "style" and ("url(" in data or "@import" in data):
            self.loads.append("style url")
        if self._cell is not None:
            self._cell += data

    def close(self):
        super().close()
        self.problems += [f"<{tag}> never closed" for tag in self._open]


@pytest.fixture(scope="module")
def ran(tmp_path_factory, protocol):
    """One synthetic trial run through every task (library calls, no scheduler), shared by
    the tests of this module: they only read it and rewrite the report."""
    root = tmp_path_factory.mktemp("report")
    home = data_home(root / "home").ensure()
    trial = make_trial(root / "trial", protocol, subjects_per_site=1, shape=SMALL)
    enrollment.import_csv(home, protocol, trial.enrollment_csv)
    for batch_id in upload_trial(home, trial):
        for step in batch.TASKS:
            batch.run_task(step, batch_id, home)
    return home, trial


@pytest.fixture
def processed(ran):
    return ran[0]


@pytest.fixture
def trial(ran):
    return ran[1]


def _parse(text):
    page = _Page()
    page.feed(text)
    page.close()
    return page


def _page(path):
    return _parse(path.read_text())


def _archived_uploads(trial):
    """The uploaded files the plan expects archived, per (arm, visit), as the site sent them:
    every file of a batch expected done, less the files it expects quarantined."""
    found = defaultdict(list)
    for planned in trial.batches:
        if planned.expect != "done":
            continue
        for path in sorted(p for p in planned.folder.rglob("*") if p.is_file()):
            if path.name not in planned.bad_files:
                ds = dcmread(path, stop_before_pixels=True)
                found[(trial.arms[planned.subject_id], planned.visit)].append((planned, ds))
    return found


def _counts(items):
    """(subjects, studies, series, images) of (subject, study, series) triples."""
    subjects, studies, series = (len({i[:n] for i in items}) for n in (1, 2, 3))
    return subjects, studies, series, len(items)


def test_the_report_counts_equal_what_was_uploaded_and_archived(processed, protocol, trial):
    report = write_arm_report(processed, protocol, as_of=AS_OF)
    header, *rows = _page(report.html).tables["counts-table"]
    assert header == ["arm", "visit", "subjects", "studies", "series", "images"]
    shown = {(r[0], r[1]): tuple(int(x) for x in r[2:]) for r in rows}
    assert len(rows) == len(shown) == len(protocol.arms) * len(protocol.visits)
    # Truth 1: the synthetic trial's plan and the files the test uploaded (original UIDs:
    # pseudonymisation maps them one to one, so the distinct counts are the same).
    uploads = _archived_uploads(trial)
    planned = {
        key: _counts([(p.subject_id, ds.StudyInstanceUID, ds.SeriesInstanceUID) for p, ds in files])
        for key, files in uploads.items()
    }
    assert {a for a, _ in planned} == set(protocol.arms) and all(all(c) for c in planned.values())
    assert {k: c for k, c in shown.items() if any(c)} == planned
    # Truth 2: the ledger's archived files, by their archive paths
    # (protocol/arm/subject/visit/study/series/instance).
    paths = defaultdict(list)
    for f in ledger.file_rows(processed):
        if f["disposition"] == "archived":
            _, arm, subject, visit, study, series, _ = f["archive_path"].split("/")
            paths[(arm, visit)].append((subject, study, series))
    assert {k: _counts(v) for k, v in paths.items()} == planned
    with report.counts_csv.open() as handle:
        assert [list(r.values()) for r in csv.DictReader(handle)] == rows


def test_the_report_is_one_well_formed_self_contained_page(processed, protocol):
    report = write_arm_report(processed, protocol, as_of=AS_OF)
    text = report.html.read_text()
    page = _parse(text)
    assert page.problems == [] and page.doctypes == 1 and text.startswith("<!doctype html>")
    assert [page.tags[t] for t in ("html", "head", "title", "body", "style")] == [1] * 5
    assert page.loads == [], "the page must not load anything from elsewhere"
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg\")", text)
    assert set(page.tables) == {"counts-table", "parameters-table", "visits-table"}


def test_each_parameter_plot_shows_every_arm_s_series(processed, protocol, trial):
    """One mark per series that carries the parameter, in the group of its arm, and a box
    for each arm with data; an arm without data has no marks."""
    report = write_arm_report(processed, protocol, as_of=AS_OF)
    page = _page(report.html)
    plotted = {(f["attrs"]["data-modality"], f["attrs"]["data-parameter"]): f for f in page.figures}
    assert set(plotted) == set(PLOTTED) and page.tags["svg"] == len(PLOTTED)
    series = defaultdict(set)  # (modality, attribute, arm) -> series UIDs carrying it
    for (arm, _), files in _archived_uploads(trial).items():
        for _, ds in files:
            for (modality, _), keyword in PLOTTED.items():
                if ds.Modality == modality and keyword in ds:
                    series[(modality, keyword, arm)].add(ds.SeriesInstanceUID)
    for (modality, column), keyword in PLOTTED.items():
        groups = plotted[(modality, column)]["groups"]
        assert set(groups) == set(protocol.arms), (modality, column)
        for arm in protocol.arms:
            expected = len(series[(modality, keyword, arm)])
            assert expected > 0, f"the trial gives {arm} {modality} {keyword} values"
            marks = groups[arm]
            assert (marks["circle"], marks["rect"]) == (expected, 1), (modality, column, arm)


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


def _mentions(text, label):
    """Whether ``label`` appears in ``text`` as a word of its own (arms are often one letter:
    "A" in "Arm" or "DEMO-01-A7" is no mention, "A" in "arm A" is)."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(label)}(?![A-Za-z0-9])", text) is not None


def _arms_mentioned(report, arms):
    """Every arm label found in any text or attribute of the page, or any CSV cell."""
    strings = _page(report.html).strings
    for path in (report.counts_csv, report.parameters_csv, report.visits_csv):
        with path.open(newline="") as handle:
            strings += [cell for row in csv.reader(handle) for cell in row]
    return {arm for arm in arms for s in strings if _mentions(s, arm)}


def test_the_blinded_report_shows_coded_groups_and_no_arm(processed, protocol):
    report = write_arm_report(processed, protocol, blinded=True, as_of=AS_OF)
    page = _page(report.html)
    groups = {r[0] for r in page.tables["counts-table"][1:]}
    assert groups == {"Group 1", "Group 2"}
    assert {r[1] for r in page.tables["visits-table"][1:]} == groups
    assert {r[2] for r in page.tables["parameters-table"][1:]} == groups
    assert all(set(f["groups"]) == groups for f in page.figures)
    assert _arms_mentioned(report, protocol.arms) == set()
    unblinded = write_arm_report(processed, protocol, as_of=AS_OF)
    assert _arms_mentioned(unblinded, protocol.arms) == set(protocol.arms)  # the check sees arms
    # Each group is the arm the trial secret codes it as: the same counts under its code.
    coding = arm_labels(processed, protocol, blinded=True)
    with unblinded.counts_csv.open() as handle:
        by_arm = [{**r, "arm": coding[r["arm"]]} for r in csv.DictReader(handle)]
    with report.counts_csv.open() as handle:
        assert sorted(csv.DictReader(handle), key=str) == sorted(by_arm, key=str)


def test_the_coded_groups_are_keyed_by_the_trial_secret(tmp_path, protocol):
    def coding(name, secret):
        home = data_home(tmp_path / name).ensure()
        path = home.secret_file(protocol.protocol_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secret.hex() + "\n")
        return arm_labels(home, protocol, blinded=True)

    secrets = [bytes([n]) * 32 for n in range(8)]
    codings = [coding(f"first-{n}", secret) for n, secret in enumerate(secrets)]
    assert all(sorted(c) == sorted(protocol.arms) for c in codings)
    assert all(sorted(c.values()) == ["Group 1", "Group 2"] for c in codings)
    # The same secret codes the arms the same way in another data home; other secrets
    # code them otherwise (two arms: two codings, both met among eight secrets).
    assert [coding(f"again-{n}", secret) for n, secret in enumerate(secrets)] == codings
    assert len({tuple(sorted(c.items())) for c in codings}) == 2


def _rendered(path, tmp_path):
    """The DOM headless Chromium builds from the page (no network, a fresh profile)."""
    chromium = shutil.which("chromium")
    assert chromium, "chromium missing: apt-get install chromium (.ci/run does)"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_report_renders_in_a_browser_as_written(processed, protocol, tmp_path):
    """Chromium's DOM holds the same tables, cells, plots and marks the page was written
    with: nothing the browser had to repair, move or drop."""
    for blinded in (False, True):
        report = write_arm_report(processed, protocol, blinded=blinded, as_of=AS_OF)
        written, rendered = _page(report.html), _parse(_rendered(report.html, tmp_path))
        assert rendered.problems == [] and rendered.tags == written.tags
        assert rendered.tables == written.tables and rendered.tables["counts-table"]
        assert [f["groups"] for f in rendered.figures] == [f["groups"] for f in written.figures]
        assert rendered.tags["svg"] == rendered.tags["figure"] == len(PLOTTED)
        assert rendered.tags["circle"] == written.tags["circle"] > 0
        assert rendered.loads == []
