import datetime as dt
import io
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from pipeline.deidentify import DeidentificationError, Deidentifier, Subject, burned_in_risk
from pipeline.dicomio import read_dicom, read_upload, write_dicom
from pipeline.enrollment import Enrollee
from pipeline.reasons import Reason
from tests.corpus import corpus_files


def test_unreadable_files_get_the_reason_a_site_can_act_on(tmp_path):
    good = get_testdata_file("CT_small.dcm")
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    text = tmp_path / "report.txt"
    text.write_text("not an image\n")
    data = Path(good).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    assert read_dicom(empty).reason is Reason.EMPTY_FILE
    assert read_dicom(text).reason is Reason.NOT_DICOM
    assert read_dicom(cut).reason is Reason.TRUNCATED
    assert read_dicom(tmp_path / "gone.dcm").reason is Reason.FILE_MISSING
    assert read_dicom(Path(good)).dataset is not None


def test_dicom_without_sop_instance_uid_is_named(tmp_path):
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPInstanceUID
    path = tmp_path / "nouid.dcm"
    ds.save_as(path)
    assert read_dicom(path).reason is Reason.MISSING_SOP_INSTANCE_UID


def test_a_bare_dataset_without_preamble_is_still_dicom():
    assert read_dicom(Path(get_testdata_file("ExplVR_LitEndNoMeta.dcm"))).reason is None


def _bad_files(tmp_path: Path) -> list[Path]:
    import pydicom

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    made = {
        "empty.dcm": b"",
        "report.txt": b"not an image\n",
        "cut-in-pixels.dcm": data[: len(data) - 1000],
        "cut-in-header.dcm": data[:700],
    }
    for name, content in made.items():
        (tmp_path / name).write_bytes(content)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "nouid.dcm")
    return [tmp_path / name for name in made] + [tmp_path / "nouid.dcm", _private_syntax(tmp_path)]


def _private_syntax(tmp_path: Path) -> Path:
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"  # GE private: not pydicom's
    ds.save_as(tmp_path / "private-syntax.dcm")
    return tmp_path / "private-syntax.dcm"


def test_a_transfer_syntax_pydicom_does_not_know_is_named_not_raised(tmp_path):
    path = _private_syntax(tmp_path)
    for read in (read_dicom(path), read_upload(path.read_bytes())):
        assert (read.dataset, read.reason) == (None, Reason.UNSUPPORTED_TRANSFER_SYNTAX)
        assert read.detail == "transfer syntax not supported"


def test_an_upload_read_in_memory_gets_the_answer_read_dicom_gives(tmp_path):
    for path in [*corpus_files(), *_bad_files(tmp_path)]:
        from_disk, in_memory = read_dicom(path), read_upload(path.read_bytes())
        assert in_memory.reason is from_disk.reason, path.name
        assert (in_memory.dataset is None) is (from_disk.dataset is None), path.name


def test_most_uploads_keep_their_pixels_apart_as_the_bytes_read():
    split = [read_upload(p.read_bytes()) for p in corpus_files()]
    kept = [r for r in split if r.pixels is not None]
    assert len(kept) > len(split) // 2
    assert all("PixelData" not in r.dataset for r in kept)


SUBJECT = Subject(Enrollee("DEMO-01-00004", "SITE-01", "B", dt.date(2023, 9, 4)), "WEEK24")


def test_a_file_written_with_its_pixels_kept_apart_is_the_file_pydicom_writes(
    tmp_path, home, protocol
):
    """trialpipe's writer (raw bytes for what is unchanged, the pixels appended as read)
    against pydicom's save_as of the whole file, de-identified the same way."""
    deidentifier = Deidentifier(home, protocol, SUBJECT)
    compared = 0
    for path in corpus_files():
        data = path.read_bytes()
        whole_read = read_upload(data, keep_pixels_apart=False)
        whole = whole_read.dataset
        if whole is None or burned_in_risk(whole):
            continue
        upload = read_upload(data)
        burned_in_risk(upload.dataset)  # as the deidentify task asks (it decodes a UN element)
        try:
            deidentifier.apply(whole, whole_read.encoded)
            deidentifier.apply(upload.dataset, upload.encoded)
        except DeidentificationError:
            continue
        refused = (TypeError, ValueError, AttributeError, KeyError, OverflowError)
        reference = io.BytesIO()
        try:
            write_dicom(whole, tmp_path / "whole.dcm")  # completes the file meta, as ours
            whole.save_as(reference, enforce_file_format=True)
        except refused:
            with pytest.raises(refused):  # a file pydicom cannot write is refused by ours
                write_dicom(upload.dataset, tmp_path / "ours.dcm", upload.pixels)
            continue
        ours = write_dicom(upload.dataset, tmp_path / "ours.dcm", upload.pixels)
        assert (tmp_path / "ours.dcm").read_bytes() == reference.getvalue(), path.name
        assert (tmp_path / "whole.dcm").read_bytes() == reference.getvalue(), path.name
        assert ours[1] == len(reference.getvalue())
        compared += 1
    # Of the 146 distinct files pydicom and pydicom-data ship, 52 are readable and de-identifiable.
    assert compared >= 52


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm"])
def test_the_checksum_returned_is_the_written_files(tmp_path, name):
    import hashlib

    upload = read_upload(Path(get_testdata_file(name)).read_bytes())
    digest, size = write_dicom(upload.dataset, tmp_path / "out.dcm", upload.pixels)
    written = (tmp_path / "out.dcm").read_bytes()
    assert (digest, size) == (hashlib.sha256(written).hexdigest(), len(written))
