import shutil

import pytest

from pipeline.home import REPO_ROOT
from pipeline.protocol import ProtocolError, known_protocols, load_protocol
from pipeline.recipe import RecipeError, compose, parse_header_actions


def test_demo_protocol_defines_arms_sites_visits_and_required_tags(protocol):
    assert protocol.arms == ("A", "B")
    assert protocol.sites == ("SITE-01", "SITE-02", "SITE-03")
    assert protocol.visit_ids == ("BASELINE", "WEEK12", "WEEK24")
    assert {"CT", "MR"} <= set(protocol.required_tags)
    assert "DEMO-01" in known_protocols()


def test_unknown_protocol_is_refused():
    with pytest.raises(ProtocolError, match="unknown protocol"):
        load_protocol("NOPE-99")


def test_recipe_layers_are_profile_then_claimed_options_then_trial_then_protocol(protocol):
    names = [p.relative_to(REPO_ROOT / "recipes").as_posix() for p in protocol.recipe_files]
    assert names[0] == "base/deid.dicom"
    assert names[-2:] == ["base/trial.dicom", "DEMO-01/deid.dicom"]
    assert names[1:-2] == [f"base/options/{o}.dicom" for o in protocol.options]


def test_a_later_layer_overrides_the_earlier_action_on_the_same_field(tmp_path):
    base = tmp_path / "base.dicom"
    base.write_text("FORMAT dicom\n%header\nBLANK StudyDate\nREMOVE StationName\n")
    option = tmp_path / "option.dicom"
    option.write_text("FORMAT dicom\n%header\nREPLACE StudyDate func:shift_date\n")
    composed = compose((base, option))
    assert [a.line() for a in composed.actions] == [
        "REPLACE StudyDate func:shift_date",
        "REMOVE StationName",
    ]


def test_recipe_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "deid.dicom"
    bad.write_text("FORMAT dicom\n%header\nSCRUB PatientName\n")
    with pytest.raises(RecipeError, match=r"deid.dicom:3: unknown action"):
        parse_header_actions(bad)


def test_recipe_version_changes_when_the_recipe_changes(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO_ROOT / "recipes", recipes)
    monkeypatch.setenv("TRIALPIPE_RECIPES", str(recipes))
    load_protocol.cache_clear()
    before = load_protocol("DEMO-01").recipe_version
    with (recipes / "DEMO-01" / "deid.dicom").open("a") as handle:
        handle.write("REMOVE BodyPartExamined\n")
    load_protocol.cache_clear()
    try:
        assert load_protocol("DEMO-01").recipe_version != before
    finally:
        monkeypatch.delenv("TRIALPIPE_RECIPES")
        load_protocol.cache_clear()


def test_an_unknown_option_is_refused(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO_ROOT / "recipes", recipes)
    definition = recipes / "DEMO-01" / "protocol.yaml"
    definition.write_text(definition.read_text().replace("clean_descriptors", "clean_everything"))
    monkeypatch.setenv("TRIALPIPE_RECIPES", str(recipes))
    load_protocol.cache_clear()
    try:
        with pytest.raises(ProtocolError, match="clean_everything"):
            load_protocol("DEMO-01")
    finally:
        monkeypatch.delenv("TRIALPIPE_RECIPES")
        load_protocol.cache_clear()
