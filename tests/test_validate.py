import dataclasses

from pipeline.protocol import TagRule
from pipeline.reasons import Reason
from pipeline.validate import check_batch


def test_the_protocol_suite_catches_a_missing_tag_and_an_out_of_range_value(protocol):
    rows = [
        {
            "file_no": 0,
            "Modality": "CT",
            "SliceThickness": "2.5",
            "KVP": "120",
            "ConvolutionKernel": "B30f",
            "PixelSpacing": ["0.7", "0.7"],
        },
        {
            "file_no": 1,
            "Modality": "CT",
            "SliceThickness": "2.5",
            "KVP": "120",
            "ConvolutionKernel": "B30f",
        },
        {
            "file_no": 2,
            "Modality": "CT",
            "SliceThickness": "9",
            "KVP": "120",
            "ConvolutionKernel": "B30f",
            "PixelSpacing": ["0.7", "0.7"],
        },
        {
            "file_no": 3,
            "Modality": "MR",
            "MagneticFieldStrength": "7",
            "RepetitionTime": "500",
            "EchoTime": "15",
            "PixelSpacing": ["0.9", "0.9"],
        },
    ]
    findings = {(f.file_no, f.keyword, f.reason, f.quarantine) for f in check_batch(protocol, rows)}
    assert findings == {
        (1, "PixelSpacing", Reason.MISSING_REQUIRED_TAG, True),
        (2, "SliceThickness", Reason.VALUE_OUT_OF_RANGE, True),
        (3, "MagneticFieldStrength", Reason.VALUE_OUT_OF_RANGE, True),
    }


def test_a_range_rule_on_a_value_that_is_not_a_number_reports_it_out_of_range(protocol):
    """Present but not a number is a bad value, not a missing one: the site must fix the
    value, not re-export the headers."""
    base = {"Modality": "CT", "KVP": "120", "ConvolutionKernel": "B30f"}
    rows = [
        {**base, "file_no": 0, "SliceThickness": "thick", "PixelSpacing": ["0.7", "0.7"]},
        {**base, "file_no": 1, "SliceThickness": "NaN", "PixelSpacing": ["0.7", "0.7"]},
        {**base, "file_no": 2, "SliceThickness": "", "PixelSpacing": ["0.7", "0.7"]},
        {**base, "file_no": 3, "SliceThickness": "2.5", "PixelSpacing": ["0.7", "0.7"]},
    ]
    findings = {
        (f.file_no, f.keyword, f.reason, f.expectation, f.observed)
        for f in check_batch(protocol, rows)
    }
    assert findings == {
        (
            0,
            "SliceThickness",
            Reason.VALUE_OUT_OF_RANGE,
            "expect_column_values_to_match_regex",
            "thick",
        ),
        (
            1,
            "SliceThickness",
            Reason.VALUE_OUT_OF_RANGE,
            "expect_column_values_to_match_regex",
            "nan",
        ),
        (
            2,
            "SliceThickness",
            Reason.MISSING_REQUIRED_TAG,
            "expect_column_values_to_not_be_null",
            None,
        ),
    }


def test_a_flag_only_rule_records_a_finding_without_quarantine(protocol):
    rows = [
        {
            "file_no": 0,
            "Modality": "CT",
            "SliceThickness": "2.5",
            "KVP": "120",
            "PixelSpacing": ["0.7", "0.7"],
        }
    ]
    (finding,) = check_batch(protocol, rows)
    assert finding.keyword == "ConvolutionKernel" and finding.quarantine is False


def test_modalities_without_rules_pass(protocol):
    lenient = dataclasses.replace(protocol, required_tags={"CT": (TagRule("KVP"),)})
    assert check_batch(lenient, [{"file_no": 0, "Modality": "US"}]) == []


def test_data_docs_render_the_failures_and_a_rerun_replaces_them(protocol, tmp_path):
    rows = [
        {
            "file_no": 0,
            "Modality": "CT",
            "SliceThickness": "9",
            "KVP": "120",
            "ConvolutionKernel": "B",
            "PixelSpacing": ["0.7", "0.7"],
        },
    ]
    docs = tmp_path / "qc" / "batch-1"
    (finding,) = check_batch(protocol, rows, docs, run_name="batch-1")
    assert (finding.keyword, finding.observed, finding.action) == (
        "SliceThickness",
        "9.0",
        "quarantine",
    )
    assert (docs / "index.html").is_file()
    (page,) = docs.glob("validations/**/*.html")
    assert "SliceThickness" in page.read_text() and "batch-1" in str(page)
    assert (docs / "static").is_symlink() and (tmp_path / "qc" / "_static").is_dir()
    check_batch(protocol, rows, docs, run_name="batch-1")
    assert len(list(docs.glob("validations/**/*.html"))) == 1
    assert sorted(p.name for p in (tmp_path / "qc").iterdir()) == ["_static", "batch-1"]


def test_a_batch_id_that_reads_like_a_date_and_time_zone_validates(protocol, tmp_path):
    # GX parses a run name as a date when no run time is given: this batch ID would be
    # 2026-11-25 14:57:20 at UTC-96:19, which no clock has.
    rows = [{"file_no": 0, "Modality": "CT"}]  # CT has rules: the suite runs
    findings = check_batch(protocol, rows, tmp_path / "docs", run_name="20261125T145720-9619ad0a")
    assert {f.reason for f in findings} == {Reason.MISSING_REQUIRED_TAG}


def test_validation_imports_no_distribution_tests_or_charts_until_they_are_used(tmp_path):
    """GX imports scipy.stats and altair for expectations trialpipe never runs; they are
    deferred (half of GX's import time) and still import on first use."""
    import subprocess
    import sys

    script = f"""
import sys
from pathlib import Path
from pipeline.protocol import load_protocol
from pipeline.validate import check_batch
rows = [{{"file_no": 0, "Modality": "CT", "SliceThickness": "x"}}]
findings = check_batch(load_protocol("DEMO-01"), rows, Path({str(tmp_path / "docs")!r}))
assert findings, "the suite ran and found the bad row"
loaded = [m for m in ("scipy.stats._stats_py", "altair.vegalite") if m in sys.modules]
import scipy.stats
print(loaded, round(float(scipy.stats.norm.cdf(0)), 2), type(sys.modules["scipy.stats"]).__name__)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["[]", "0.5", "module"]


def test_a_batchs_data_docs_reuse_the_templates_an_earlier_process_compiled(tmp_path):
    """GX compiles its Jinja templates for every view of every batch; the bytecode cache
    (under the temporary directory) lets a later validate task load them instead."""
    import os
    import subprocess
    import sys

    script = """
import sys
from pathlib import Path
import jinja2
from pipeline.protocol import load_protocol
from pipeline.validate import check_batch
compiled = []
original = jinja2.Environment.compile
def counted(self, source, name=None, *args, **kwargs):
    compiled.append(name)
    return original(self, source, name, *args, **kwargs)
jinja2.Environment.compile = counted
rows = [{"file_no": 0, "Modality": "CT", "SliceThickness": "9"}]
docs = Path(sys.argv[1])
assert check_batch(load_protocol("DEMO-01"), rows, docs, run_name="batch-1")
(page,) = docs.glob("validations/**/*.html")
assert "SliceThickness" in page.read_text()
print(len(compiled))
"""
    env = {**os.environ, "TMPDIR": str(tmp_path)}

    def compiled(docs: str) -> int:
        run = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / docs)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        return int(run.stdout.split()[-1])

    assert compiled("first") > 20  # GX's page, section and component templates
    assert compiled("second") == 0
    assert any(tmp_path.glob("_jinja2-cache-*/__jinja2_*.cache"))
