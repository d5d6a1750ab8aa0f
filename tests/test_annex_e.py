"""The base profile is Table E.1-1, all of it, and the committed recipes are what the table
and the options generate."""

from pipeline import annex_e
from pipeline.recipe import parse_header_actions


def test_the_table_is_pinned_to_one_edition_and_complete():
    rows = annex_e.load_table()
    assert annex_e.edition() == "2026c"
    assert len(rows) == 655
    assert len({r.tag for r in rows}) == len(rows)
    assert {r.basic for r in rows} <= {"X", "Z", "D", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}


def test_committed_recipes_equal_what_the_table_generates():
    for path, text in annex_e.generated_files().items():
        assert path.read_text() == text, f"{path} is stale: run python -m pipeline.annex_e"


def test_every_row_of_the_table_is_acted_on_by_the_base_recipe():
    base = annex_e.recipes_dir() / "base" / "deid.dicom"
    actions, _ = parse_header_actions(base)
    selectors = {a.selector for a in actions}
    assert annex_e.uncovered_rows(selectors) == []
    lines = {a.line() for a in actions}
    assert "REPLACE SOPInstanceUID func:uid" in lines
    assert "REPLACE MediaStorageSOPInstanceUID func:uid" in lines
    assert "REMOVE AffectedSOPInstanceUID" in lines  # an X row of VR UI is removed


def test_combined_codes_choose_the_action_that_keeps_the_object_valid():
    by_code = {}
    for row in annex_e.load_table():
        by_code.setdefault(row.basic, row)
    assert annex_e.basic_action(by_code["X"]).startswith("REMOVE ")
    assert annex_e.basic_action(by_code["Z"]).startswith("BLANK ")
    assert annex_e.basic_action(by_code["X/Z"]).startswith("BLANK ")
    for code in ("D", "X/D", "Z/D", "X/Z/D"):
        row = by_code[code]
        expected = "BLANK " if row.vr == "SQ" else "REPLACE "
        assert annex_e.basic_action(row).startswith(expected), code
    assert annex_e.basic_action(by_code["X/Z/U*"]) is None  # its UIDs have their own rows


def test_modified_dates_shift_dates_keep_times_and_never_touch_the_birth_date():
    text = annex_e.option_recipe_text("retain_longitudinal_modified_dates")
    assert "REPLACE StudyDate func:shift_date" in text
    assert "KEEP StudyTime" in text
    assert "PatientBirthDate" not in text


def test_each_option_knows_its_cid_7050_code():
    codes = annex_e.option_codes()
    assert codes["retain_longitudinal_modified_dates"][0] == "113107"
    assert codes["clean_descriptors"][0] == "113105"
    assert codes["retain_patient_characteristics"][0] == "113108"
    assert codes["retain_device_identity"][0] == "113109"
    assert codes["retain_safe_private"][0] == "113111"
