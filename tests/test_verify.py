import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipeline.verify import identifying_values, residual_phi


def _original() -> Dataset:
    ds = Dataset()
    ds.PatientName = "OKAFOR^AMARA^B"
    ds.PatientID = "MRN55501234"
    ds.PatientBirthDate = "19610412"
    ds.InstitutionName = "Mercy West Medical Center"
    ds.SOPInstanceUID = "1.2.840.99999.7.20250101.5"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    return ds


def _clean_output() -> Dataset:
    ds = Dataset()
    ds.PatientName = "DEMO-01-01001"
    ds.PatientID = "DEMO-01-01001"
    ds.SOPInstanceUID = "2.25.1234"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    return ds


def test_a_clean_output_has_no_hits():
    assert residual_phi(identifying_values(_original()), _clean_output()) == []


def test_a_value_left_in_a_nested_item_is_found_by_attribute_never_by_value():
    output = _clean_output()
    item = Dataset()
    item.PatientID = "old id MRN55501234 (merged)"
    output.OtherPatientIDsSequence = Sequence([item])
    hits = residual_phi(identifying_values(_original()), output)
    assert hits == ["PatientID"]
    assert "MRN55501234" not in " ".join(hits)


def test_a_name_part_in_a_private_element_is_found():
    output = _clean_output()
    block = output.private_block(0x0011, "ACME", create=True)
    block.add_new(0x01, "LO", "reviewed for okafor")
    assert residual_phi(identifying_values(_original()), output) == ["(0011,1001)"]


def test_original_uids_and_dates_count_as_identifying_but_sop_classes_do_not():
    values = identifying_values(_original()).values
    assert "1.2.840.99999.7.20250101.5" in values and "19610412" in values
    assert "1.2.840.10008.5.1.4.1.1.2" not in values


def test_retained_attributes_are_not_searched():
    retained = identifying_values(_original(), frozenset({"InstitutionName"}))
    assert "Mercy West Medical Center" not in retained.values


def test_identifying_values_of_a_real_scanner_file_include_its_patient():
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert str(ct.PatientID) in identifying_values(ct).values
