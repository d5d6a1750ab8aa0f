from pathlib import Path

from pydicom.data import get_testdata_file

from pipeline.dicomio import read_dicom
from pipeline.reasons import Reason


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
