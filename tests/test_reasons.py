from pathlib import Path

from pipeline.reasons import BatchState, Reason, Scope

DOC = Path(__file__).resolve().parents[1] / "docs" / "quarantine.md"


def test_every_reason_tells_the_site_what_to_do():
    for reason in Reason:
        assert reason.info.summary.endswith(".")
        assert len(reason.info.action) > 20
        assert reason.scope in (Scope.FILE, Scope.BATCH)


def test_every_reason_code_is_documented_for_sites():
    text = DOC.read_text()
    for reason in Reason:
        assert f"`{reason.value}`" in text, reason


def test_only_done_and_quarantined_batches_are_terminal():
    assert {s for s in BatchState if s.terminal} == {BatchState.DONE, BatchState.QUARANTINED}


def test_the_quarantine_doc_carries_the_current_reason_table():
    from pipeline.reasons import markdown_table

    assert markdown_table() in DOC.read_text()
