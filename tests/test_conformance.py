"""De-identification must not make a file less valid: dciodvfy (dicom3tools) finds no error
in the output that the input did not have, over every archivable file of the corpus; the
corpus files that cannot be archived are quarantined with a reason, never a crash."""

import datetime as dt
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline import batch, enrollment, intake
from pipeline.deidentify import BurnedInAnnotationError, Deidentifier, Subject, burned_in_risk
from pipeline.dicomio import read_dicom, write_dicom
from pipeline.enrollment import Enrollee
from pipeline.worklist import Worklist
from tests.corpus import corpus_files

SUBJECT = Subject(Enrollee("DEMO-01-00001", "SITE-01", "A", dt.date(2020, 1, 6)), "BASELINE")


def _baseline(path: Path, target: Path) -> Path:
    """The input as pydicom writes it back unchanged, so that what reading and writing alone
    do (inflating a deflated file, completing the file meta) is not counted against
    de-identification; the original itself where pydicom cannot write it back."""
    try:
        write_dicom(read_dicom(path).dataset, target)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError):
        return path
    return target


READABLE = [p for p in corpus_files() if read_dicom(p).dataset is not None]
UNREADABLE = [p for p in corpus_files() if p not in READABLE]


def dciodvfy_errors(path) -> set[str]:
    """Error lines of dciodvfy, with quoted values blanked (they change with the values)."""
    result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    lines = (result.stdout + result.stderr).splitlines()
    return {
        re.sub(r"= <[^>]*>", "= <>", " ".join(line.split()))
        for line in lines
        if line.startswith("Error")
    }


def test_dciodvfy_is_installed():
    assert shutil.which("dciodvfy"), "dciodvfy missing: apt-get install dicom3tools (.ci/run does)"


def test_the_corpus_is_the_real_thing():
    # 146 distinct files: pydicom reads 134 of them; the rest are truncated or not DICOM.
    assert len(READABLE) >= 134 and len(UNREADABLE) <= 12


@pytest.mark.parametrize("source", READABLE, ids=lambda p: p.name)
def test_deidentification_adds_no_conformance_error(source, home, protocol, tmp_path):
    baseline = _baseline(source, tmp_path / "baseline.dcm")
    ds = read_dicom(source).dataset
    try:
        Deidentifier(home, protocol, SUBJECT).apply(ds)
    except BurnedInAnnotationError:
        # Quarantined, so never archived: only images at risk may take this way out.
        assert burned_in_risk(read_dicom(source).dataset)
        return
    output = tmp_path / "output.dcm"
    write_dicom(ds, output)
    assert dciodvfy_errors(output) - dciodvfy_errors(baseline) == set()


@pytest.mark.parametrize("source", UNREADABLE, ids=lambda p: p.name)
def test_an_unreadable_corpus_file_is_quarantined_with_a_reason(source, home, protocol, tmp_path):
    csv = tmp_path / "e.csv"
    csv.write_text(
        "site_id,subject_id,arm,randomization_date\nSITE-01,DEMO-01-00001,A,2020-01-06\n"
    )
    enrollment.import_csv(home, protocol, csv)
    batch_id = intake.stage_batch(home, "DEMO-01", "SITE-01", "DEMO-01-00001", "BASELINE", [source])
    batch.claim(home, batch_id)
    worklist = Worklist.load(batch.deidentify(home, batch_id))
    (entry,) = worklist.files
    assert entry.reason or worklist.batch_reason
