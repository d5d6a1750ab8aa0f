import pytest

from pipeline.enrollment import EnrollmentError, import_csv, lookup


def _csv(tmp_path, rows, name="enrollment.csv"):
    path = tmp_path / name
    path.write_text("site_id,subject_id,arm,randomization_date\n" + "".join(r + "\n" for r in rows))
    return path


def test_reimporting_the_same_rows_is_a_no_op(home, protocol, tmp_path):
    path = _csv(tmp_path, ["SITE-01,S-1,A,2025-01-10", "SITE-02,S-2,B,2025-02-11"])
    first = import_csv(home, protocol, path)
    again = import_csv(home, protocol, path)
    assert (first.added, first.unchanged) == (2, 0)
    assert (again.added, again.unchanged) == (0, 2)
    assert lookup(home, "DEMO-01", "S-2").arm == "B"


def test_a_subject_changing_arm_is_refused_and_nothing_is_written(home, protocol, tmp_path):
    import_csv(home, protocol, _csv(tmp_path, ["SITE-01,S-1,A,2025-01-10"]))
    changed = _csv(tmp_path, ["SITE-01,S-3,A,2025-01-12", "SITE-01,S-1,B,2025-01-10"], "b.csv")
    with pytest.raises(EnrollmentError, match=r"line 3: subject S-1 .* another arm"):
        import_csv(home, protocol, changed)
    assert lookup(home, "DEMO-01", "S-1").arm == "A"
    assert lookup(home, "DEMO-01", "S-3") is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("SITE-09,S-1,A,2025-01-10", "unknown site"),
        ("SITE-01,S-1,C,2025-01-10", "unknown arm"),
        ("SITE-01,S-1,A,10/01/2025", "YYYY-MM-DD"),
        ("SITE-01,,A,2025-01-10", "every column"),
    ],
)
def test_invalid_rows_are_refused_with_their_line(home, protocol, tmp_path, row, message):
    with pytest.raises(EnrollmentError, match=message):
        import_csv(home, protocol, _csv(tmp_path, [row]))


def test_missing_columns_are_named(home, protocol, tmp_path):
    path = tmp_path / "e.csv"
    path.write_text("site_id,subject_id\nSITE-01,S-1\n")
    with pytest.raises(EnrollmentError, match="arm, randomization_date"):
        import_csv(home, protocol, path)
