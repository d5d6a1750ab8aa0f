"""`trialpipe recipe check` finds what a recipe author gets wrong, with file and line."""

import shutil

import pytest

from pipeline.cli import main
from pipeline.home import REPO_ROOT
from pipeline.protocol import load_protocol


@pytest.fixture
def recipes(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    shutil.copytree(REPO_ROOT / "recipes", folder)
    monkeypatch.setenv("TRIALPIPE_RECIPES", str(folder))
    load_protocol.cache_clear()
    yield folder
    load_protocol.cache_clear()


def check(capsys, home):
    code = main(["--home", str(home.root), "recipe", "check", "DEMO-01"])
    return code, capsys.readouterr().out


def append(recipes, text):
    with (recipes / "DEMO-01" / "deid.dicom").open("a") as handle:
        handle.write(text)


def test_the_shipped_protocol_is_valid(capsys, home, recipes):
    assert check(capsys, home) == (0, "DEMO-01: protocol and recipe are valid\n")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("SCRUB PatientName\n", "deid.dicom:9: unknown action 'SCRUB'"),
        ("REMOVE PatientNmae\n", "deid.dicom:9: unknown attribute keyword 'PatientNmae'"),
        ("REPLACE StudyID func:hash_it\n", "deid.dicom:9: unknown function 'hash_it'"),
        ("REPLACE StudyID var:site\n", "deid.dicom:9: unknown variable 'site'"),
        ("KEEP InstitutionName\n", "deid.dicom:9: KEEP InstitutionName keeps an attribute"),
        ("REMOVE PatientIdentityRemoved\n", "must ADD PatientIdentityRemoved"),
    ],
)
def test_a_broken_recipe_line_is_named_and_exits_nonzero(capsys, home, recipes, line, message):
    append(recipes, line)
    code, out = check(capsys, home)
    assert code == 1 and message in out


def test_a_kept_attribute_is_fine_when_a_claimed_option_retains_it(capsys, home, recipes):
    append(recipes, "KEEP StationName\n")  # Retain Device Identity is claimed by DEMO-01
    assert check(capsys, home)[0] == 0


def test_a_required_tag_that_is_not_a_keyword_is_named(capsys, home, recipes):
    definition = recipes / "DEMO-01" / "protocol.yaml"
    definition.write_text(definition.read_text().replace("tag: KVP,", "tag: KVPP,"))
    code, out = check(capsys, home)
    assert code == 1 and "protocol.yaml:" in out and "'KVPP'" in out


def test_invalid_yaml_is_named_with_its_line(capsys, home, recipes):
    definition = recipes / "DEMO-01" / "protocol.yaml"
    definition.write_text(definition.read_text() + "arms: [A, B\n")
    code, out = check(capsys, home)
    assert code == 1 and "protocol.yaml:" in out and "not valid YAML" in out
