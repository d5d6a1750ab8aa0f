"""Bad input gets a reason, never a crashed run and never a lost file."""

import io
import json
import shutil
import struct
import zipfile

import pytest
import yaml
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword

from pipeline import intake, ledger
from pipeline.home import REPO_ROOT
from pipeline.protocol import load_protocol
from tests.accounting import assert_accounted, files_in, process, stage


def outcome(home, batch_id):
    """file path -> reason (None when archived) and the batch's state."""
    record = json.loads(home.batch_record(batch_id).read_text())
    trail = ledger.trail(home, batch_id)
    quarantined = {}
    folder = home.quarantined_batch(batch_id)
    if (folder / "quarantine.json").exists():
        for item in json.loads((folder / "quarantine.json").read_text())["files"]:
            quarantined[item["path"]] = item["reason"]
    assert len(record["files"]) == len(ledger.file_rows(home, batch_id))
    return quarantined, trail["batch"]["state"]


@pytest.fixture
def limited(monkeypatch, tmp_path):
    """DEMO-01 with small intake limits: 10 kB per file, 3 files or 30x expansion per zip."""
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO_ROOT / "recipes", recipes)
    path = recipes / "DEMO-01" / "protocol.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["intake"] = {"max_file_mb": 0.01, "max_archive_files": 3, "max_expansion_ratio": 30}
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("TRIALPIPE_RECIPES", str(recipes))
    load_protocol.cache_clear()
    yield load_protocol("DEMO-01")
    load_protocol.cache_clear()


def _stage(home, planned, paths, check=True):
    return intake.stage_batch(
        home, "DEMO-01", planned.site_id, planned.subject_id, planned.visit, paths, check=check
    )


def _zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_file_over_the_size_limit_is_refused_unread(enrolled, trial, limited, tmp_path):
    planned = trial.batches[2]
    big = tmp_path / "up" / "big.dcm"
    big.parent.mkdir()
    ds = dcmread(sorted((planned.folder / "CT").glob("*.dcm"))[0])
    ds.PixelData = b"\0" * 20_000
    ds.Rows, ds.Columns = 100, 100
    ds.save_as(big)
    batch_id = _stage(enrolled, planned, [planned.folder / "CT", big])
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert quarantined == {"big.dcm": "file_too_large"} and state == "done"


def test_an_empty_file_and_a_dicom_without_sop_instance_uid_among_good_files_are_refused_alone(
    enrolled, trial, tmp_path
):
    planned = trial.batches[2]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "empty.dcm").write_bytes(b"")
    ds = dcmread(sorted((planned.folder / "CT").glob("*.dcm"))[0])
    del ds.SOPInstanceUID
    ds.save_as(odd / "no_uid.dcm")
    batch_id, uploaded = stage(enrolled, planned, [planned.folder, odd])
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert state == "done"
    assert quarantined == {
        "odd/empty.dcm": "empty_file",
        "odd/no_uid.dcm": "missing_sop_instance_uid",
    }
    good = files_in([planned.folder])
    assert ledger.batch_summary(enrolled, batch_id)["archived"] == good == uploaded - 2
    assert_accounted(enrolled, uploaded)


def test_a_zip_of_images_is_expanded_and_its_members_archived(enrolled, trial, tmp_path):
    planned = trial.batches[2]
    members = {f"CT/{p.name}": p.read_bytes() for p in (planned.folder / "CT").glob("*.dcm")}
    members["notes.txt"] = b"scan notes"
    archive = _zip(tmp_path / "study.zip", members)
    batch_id = _stage(enrolled, planned, [archive, planned.folder / "MR"])
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert quarantined == {"study.zip.unzipped/notes.txt": "not_dicom"} and state == "done"
    row = ledger.batch_summary(enrolled, batch_id)
    assert row["archived"] == len(members) - 1 + len(list((planned.folder / "MR").iterdir()))
    kept = enrolled.originals(batch_id) / "files"
    assert (kept / "study.zip").is_file()  # the upload itself is kept with the originals


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ({"../../../etc/evil.dcm": b"x"}, "outside the zip"),
        ({"/abs/evil.dcm": b"x"}, "outside the zip"),
        ({"C:/evil.dcm": b"x"}, "outside the zip"),
        ({f"f{i}.dcm": b"x" for i in range(4)}, "more than 3 files"),
        ({"zeros.dcm": b"\0" * 9_000}, "expands more than 30 times"),
    ],
)
def test_an_unsafe_zip_is_refused_unopened(enrolled, trial, limited, tmp_path, members, why):
    planned = trial.batches[2]
    archive = _zip(tmp_path / "upload.zip", members)
    batch_id = _stage(enrolled, planned, [archive, planned.folder / "MR"])
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert quarantined == {"upload.zip": "unsafe_archive"} and state == "done"
    (item,) = json.loads((enrolled.quarantined_batch(batch_id) / "quarantine.json").read_text())[
        "files"
    ]
    assert why in item["detail"]
    assert not list(enrolled.root.rglob("evil.dcm"))
    assert not (tmp_path / "etc").exists()


def test_odd_file_names_are_processed_and_never_leave_the_boundary(enrolled, trial, tmp_path):
    planned = trial.batches[2]
    patient = trial.patients[planned.subject_id]
    family = patient.name.split("^")[0]
    odd = tmp_path / "odd"
    names = [
        f"{family} scan 01.dcm",
        "-leading dash.dcm",
        "ünïcödé 画像.dcm",
        "line\nbreak.dcm",
        "x" * 200 + ".dcm",
        "no_extension",
    ]
    sources = sorted((planned.folder / "CT").glob("*.dcm")) + sorted(
        (planned.folder / "MR").glob("*.dcm")
    )
    odd.mkdir()
    for name, source in zip(names, sources, strict=False):
        shutil.copy(source, odd / name)
    batch_id = _stage(enrolled, planned, [odd])
    process(enrolled, batch_id)
    row = ledger.batch_summary(enrolled, batch_id)
    assert (row["archived"], row["quarantined"]) == (len(names), 0)
    kept = {p.name for p in (enrolled.originals(batch_id) / "files" / "odd").iterdir()}
    assert kept == set(names)
    for path in enrolled.root.rglob("*"):
        top = path.relative_to(enrolled.root).parts[0]
        if path.is_file() and top not in ("inbox", "quarantine", "restricted"):
            assert family.lower().encode() not in path.read_bytes().lower(), path


def test_a_ready_marker_without_a_manifest_quarantines_the_batch(enrolled, trial):
    planned = trial.batches[2]
    batch_id = _stage(enrolled, planned, [planned.folder], check=False)  # a drop folder
    (intake.find_upload(enrolled, batch_id) / intake.MANIFEST).unlink()
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert state == "quarantined" and set(quarantined.values()) == {"manifest_invalid"}
    assert len(quarantined) == len(list(planned.folder.rglob("*.dcm")))
    assert ledger.batch_summary(enrolled, batch_id)["protocol_id"] == "unknown"


@pytest.mark.parametrize(
    ("field", "value"),
    [("protocol_id", "NOPE-99"), ("site_id", "SITE-99"), ("visit", "WEEK99")],
)
def test_a_manifest_edited_to_name_something_unknown_quarantines_the_batch(
    enrolled, trial, field, value
):
    planned = trial.batches[2]
    batch_id = _stage(enrolled, planned, [planned.folder])
    manifest_path = intake.find_upload(enrolled, batch_id) / intake.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest[field] = value
    manifest_path.write_text(json.dumps(manifest))
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert state == "quarantined" and set(quarantined.values()) == {"manifest_invalid"}


def test_a_manifest_naming_a_path_outside_the_batch_moves_nothing_from_there(
    enrolled, trial, tmp_path
):
    planned = trial.batches[2]
    batch_id = _stage(enrolled, planned, [planned.folder])
    folder = intake.find_upload(enrolled, batch_id)
    outside = enrolled.root / "secret.txt"
    outside.write_text("do not touch")
    manifest = json.loads((folder / intake.MANIFEST).read_text())
    manifest["files"].append({"path": "../../../../secret.txt", "sha256": "0" * 64, "size": 12})
    (folder / intake.MANIFEST).write_text(json.dumps(manifest))
    process(enrolled, batch_id)
    _, state = outcome(enrolled, batch_id)
    assert state == "quarantined" and outside.read_text() == "do not touch"


def test_a_batch_with_no_dicom_at_all_is_refused_as_such(enrolled, trial, tmp_path):
    planned = trial.batches[2]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "report.pdf").write_bytes(b"%PDF-1.4 not an image")
    (folder / "empty.dcm").write_bytes(b"")
    batch_id = _stage(enrolled, planned, [folder])
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert state == "quarantined"
    assert set(quarantined.values()) == {"no_dicom_in_batch"} and len(quarantined) == 2


def test_a_zip_that_is_not_really_one_is_refused_with_a_reason(enrolled, trial, tmp_path):
    planned = trial.batches[2]
    fake = tmp_path / "broken.zip"
    data = io.BytesIO()
    _zip(data, {"a.dcm": b"x" * 1000})
    fake.write_bytes(data.getvalue()[:60])  # a zip cut off after its first header
    batch_id = _stage(enrolled, planned, [fake, planned.folder / "MR"])
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert quarantined == {"broken.zip": "unsafe_archive"} and state == "done"


def _with_corrupt_vr(data, keyword):
    """``data`` (explicit VR) with the VR of ``keyword``'s element replaced by one no
    standard defines, as a damaged header has it."""
    tag = tag_for_keyword(keyword)
    header = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + dictionary_VR(tag).encode()
    at = data.index(header)
    return data[: at + 4] + b"ZZ" + data[at + 6 :]


def test_files_of_an_unknown_transfer_syntax_or_a_corrupt_vr_are_refused_alone(
    enrolled, trial, tmp_path
):
    planned = trial.batches[2]
    odd = tmp_path / "odd"
    odd.mkdir()
    source = dcmread(sorted((planned.folder / "CT").glob("*.dcm"))[0])
    source.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"  # GE private: not pydicom's
    source.save_as(odd / "private_syntax.dcm")
    good = sorted((planned.folder / "MR").glob("*.dcm"))[0]
    (odd / "corrupt_vr.dcm").write_bytes(_with_corrupt_vr(good.read_bytes(), "SliceThickness"))
    batch_id, uploaded = stage(enrolled, planned, [planned.folder, odd])
    process(enrolled, batch_id)
    quarantined, state = outcome(enrolled, batch_id)
    assert state == "done"
    assert quarantined == {
        "odd/private_syntax.dcm": "unsupported_transfer_syntax",
        "odd/corrupt_vr.dcm": "deid_failed",
    }
    assert ledger.batch_summary(enrolled, batch_id)["archived"] == files_in([planned.folder])
    assert_accounted(enrolled, uploaded)
    details = {
        item["path"]: item["detail"]
        for item in json.loads(
            (enrolled.quarantined_batch(batch_id) / "quarantine.json").read_text()
        )["files"]
    }
    assert details == {
        "odd/private_syntax.dcm": "transfer syntax not supported",
        "odd/corrupt_vr.dcm": "an element cannot be decoded (NotImplementedError)",
    }
    phi = {
        value.lower()
        for ds in (source, dcmread(good))
        for value in [*str(ds.PatientName).split("^"), str(ds.PatientID)]
        if len(value) > 1  # a middle initial is in many words
    }
    recorded = " ".join(row["detail"] or "" for row in ledger.file_rows(enrolled, batch_id))
    assert phi and not [value for value in phi if value in recorded.lower()]
