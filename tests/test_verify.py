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


def _decoded_strings(element):
    value = element.value
    if value is None or value == "" or isinstance(value, (bytes, bytearray)):
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value if v not in (None, "")]
    return [str(value)]


def _elements_as_pydicom_decodes_them(ds):
    meta = getattr(ds, "file_meta", None)
    yield from (meta.iterall() if meta is not None else ())
    yield from ds.iterall()


def _reference_values(ds):
    """identifying_values as first written: every element decoded by pydicom."""
    import re

    from pydicom.uid import UID_dictionary

    from pipeline.verify import IDENTIFYING_KEYWORDS, MIN_LENGTH, identifying_uid_keywords

    found = set()
    for element in _elements_as_pydicom_decodes_them(ds):
        if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UN"):
            continue
        if element.tag.group == 0x0002 and element.keyword != "MediaStorageSOPInstanceUID":
            continue
        if element.VR == "PN":
            for name in _decoded_strings(element):
                found.add(name)
                found.update(p for p in re.split(r"[\^= ,.]+", name) if p)
        elif element.VR == "UI":
            if element.keyword in identifying_uid_keywords():
                found.update(v for v in _decoded_strings(element) if v not in UID_dictionary)
        elif element.VR in ("DA", "DT") or element.keyword in IDENTIFYING_KEYWORDS:
            found.update(_decoded_strings(element))
    return frozenset(v.strip() for v in found if len(v.strip()) >= MIN_LENGTH)


def _reference_hits(original, output):
    hits = set()
    for element in _elements_as_pydicom_decodes_them(output):
        if element.VR in ("OB", "OW", "OF", "OD", "OL", "OV", "SQ") or element.tag == 0x7FE00010:
            continue
        if element.VR == "UN" and isinstance(element.value, (bytes, bytearray)):
            texts = [element.value.decode("latin-1", "replace")]
        else:
            texts = _decoded_strings(element)
        if any(original.find(text) for text in texts):
            hits.add(element.keyword or str(element.tag))
    return hits


def test_values_read_from_the_bytes_as_read_are_those_pydicom_decodes():
    """identifying_values and residual_phi decode only what they need, from the bytes read;
    over every file pydicom ships they find exactly what decoding every element finds."""
    from pipeline.dicomio import read_dicom
    from tests.corpus import corpus_files

    compared = 0
    for path in corpus_files():
        ours, reference = read_dicom(path).dataset, read_dicom(path).dataset
        if ours is None:
            continue
        values = identifying_values(ours)
        assert values.values == _reference_values(reference), path.name
        hits = residual_phi(values, ours)
        assert set(hits) == _reference_hits(values, reference), path.name
        assert len(hits) == len(set(hits))
        compared += 1
    assert compared >= 134  # of the 146 distinct files shipped, every one pydicom reads


def _pydicom_texts(path):
    from pipeline.dicomio import read_elements, texts, walk

    ds = read_elements(path).dataset
    return [(int(t), texts(h, t, vr, codec)) for h, t, vr, codec in walk(ds) if t != 0x7FE00010]


def test_the_scanner_reads_every_value_as_pydicom_decodes_it(tmp_path, home, protocol):
    """The verify task reads each file with dicomscan; over every file pydicom ships, and
    over each of them as trialpipe writes it de-identified, the scanner yields exactly the
    values pydicom decodes, or leaves the file to pydicom."""
    import datetime as dt

    from pipeline.deidentify import DeidentificationError, Deidentifier, Subject, burned_in_risk
    from pipeline.dicomio import read_upload, write_dicom
    from pipeline.dicomscan import file_texts
    from pipeline.enrollment import Enrollee
    from tests.corpus import corpus_files

    subject = Subject(Enrollee("DEMO-01-00004", "SITE-01", "B", dt.date(2023, 9, 4)), "WEEK24")
    deidentifier = Deidentifier(home, protocol, subject)
    scanned = written = 0
    for number, path in enumerate(corpus_files()):
        candidates = [path]
        upload = read_upload(path.read_bytes())
        if upload.dataset is not None and not burned_in_risk(upload.dataset):
            try:
                deidentifier.apply(upload.dataset, upload.encoded)
                output = tmp_path / f"{number}.dcm"
                write_dicom(upload.dataset, output, upload.pixels)
                candidates.append(output)
                written += 1
            except (DeidentificationError, TypeError, ValueError, AttributeError, KeyError):
                pass
        for candidate in candidates:
            found = file_texts(candidate)
            if found is not None:
                assert found == _pydicom_texts(candidate), candidate.name
                scanned += 1
    # Of the 146 distinct files, 52 are de-identified and written; 141 files are scanned.
    assert written >= 52 and scanned >= 141
