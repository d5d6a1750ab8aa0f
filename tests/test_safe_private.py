"""Retain Safe Private: only the private elements a protocol lists, per manufacturer's block,
survive; and only when the protocol claims the option."""

import dataclasses
import datetime as dt
import shutil

from pipeline.deidentify import Deidentifier, Subject
from pipeline.dicomio import read_dicom
from pipeline.enrollment import Enrollee
from pipeline.home import REPO_ROOT
from pipeline.protocol import SafePrivate, load_protocol
from pipeline.synth import PRIVATE_CREATOR

SUBJECT = Subject(Enrollee("DEMO-01-00003", "SITE-03", "A", dt.date(2024, 2, 5)), "WEEK12")
SAFE = (SafePrivate(0x0009, PRIVATE_CREATOR, frozenset({0x12})),)


def _original(trial):
    return read_dicom(sorted((trial.batches[0].folder / "CT").glob("CT2_000*.dcm"))[0]).dataset


def test_only_the_listed_private_element_and_its_creator_survive(home, protocol, trial):
    claimed = dataclasses.replace(
        protocol, options=(*protocol.options, "retain_safe_private"), safe_private=SAFE
    )
    ds = _original(trial)
    Deidentifier(home, claimed, SUBJECT).apply(ds)
    private = {int(e.tag): e.value for e in ds if e.tag.is_private}
    assert private == {0x00090010: PRIVATE_CREATOR, 0x00091012: "1.25"}
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert "113111" in codes


def test_a_safe_list_without_the_claimed_option_keeps_nothing(home, protocol, trial):
    unclaimed = dataclasses.replace(protocol, safe_private=())
    ds = _original(trial)
    Deidentifier(home, unclaimed, SUBJECT).apply(ds)
    assert not any(e.tag.is_private for e in ds.iterall())


def test_protocol_yaml_declares_the_safe_list_per_manufacturer_block(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    shutil.copytree(REPO_ROOT / "recipes", recipes)
    definition = recipes / "DEMO-01" / "protocol.yaml"
    text = definition.read_text().replace(
        "    - clean_descriptors\n",
        "    - clean_descriptors\n    - retain_safe_private\n"
        f'  safe_private:\n    - {{group: "0009", creator: "{PRIVATE_CREATOR}", '
        'elements: ["12"]}\n',
    )
    definition.write_text(text)
    monkeypatch.setenv("TRIALPIPE_RECIPES", str(recipes))
    load_protocol.cache_clear()
    try:
        assert load_protocol("DEMO-01").safe_private == SAFE
    finally:
        load_protocol.cache_clear()
