"""DICOM PS3.15 Annex E, Table E.1-1, as data, and the deid recipes generated from it.

``recipes/base/annex-e/table-e1-1.csv`` holds every row of the table (edition in
``options.yaml``): tag, name, keyword, VR and the Basic Profile action code.
``options.yaml`` says which rows each option changes. From the two this module generates
``recipes/base/deid.dicom`` (the Basic Profile) and ``recipes/base/options/<option>.dicom``;
the generated files are committed and a test keeps them equal to what this module makes.

How action codes become deid actions (the choice for the combined codes keeps the object
valid for any IOD, since a dummy or an empty value is valid where removal may not be):

=========  ======================================================================
X          REMOVE
Z          BLANK (zero-length value; an empty sequence for SQ)
D          REPLACE func:dummy (a VR-valid dummy)
X/Z        BLANK
X/D, Z/D,  REPLACE func:dummy
X/Z/D
U          REPLACE func:uid (a keyed pseudonym; the same for every occurrence, in any
           sequence and in the file meta); also the dummy for UI rows coded D
X/Z/U*     the sequence stays; the UIDs in it are remapped by their own U rows
SQ rows    coded D, X/D, Z/D, X/Z/D or X/Z: the sequence stays and its items are cleaned
           by the rows of the attributes inside them (at any depth); an empty or missing
           sequence would break Type 1 and 3 sequence rules, and no dummy sequence means
           anything. Residual-PHI verification then checks what is left.
=========  ======================================================================

Rows with a masked tag (curves 50xx, overlay data and comments 60xx) are removed before the
recipe runs, with the whole repeating group so no half overlay remains
(``deidentify.remove_structural``), as are private elements unless safe-listed.

Regenerate after editing the table or options: ``python -m pipeline.annex_e``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from pipeline.home import recipes_dir

TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "PN"})
DATE_VRS = frozenset({"DA", "DT"})


@dataclass(frozen=True)
class Row:
    """One row of Table E.1-1."""

    tag: str
    name: str
    keyword: str
    vr: str
    basic: str

    @property
    def selector(self) -> str:
        """How a recipe names the attribute: its keyword, or its tag if pydicom has none."""
        return self.keyword or self.tag

    @property
    def masked(self) -> bool:
        return "xx" in self.tag


def annex_dir() -> Path:
    return recipes_dir() / "base" / "annex-e"


@lru_cache(maxsize=1)
def load_table() -> tuple[Row, ...]:
    """The rows of Table E.1-1, as committed."""
    with (annex_dir() / "table-e1-1.csv").open(newline="") as handle:
        return tuple(
            Row(r["tag"], r["name"], r["keyword"], r["vr"], r["basic_profile"])
            for r in csv.DictReader(handle)
        )


@lru_cache(maxsize=1)
def load_options() -> dict[str, Any]:
    """``options.yaml``: edition and, per option, its CID 7050 code and attributes."""
    return yaml.safe_load((annex_dir() / "options.yaml").read_text())


def edition() -> str:
    return str(load_options()["edition"])


def option_codes() -> dict[str, tuple[str, str]]:
    """CID 7050 code and meaning of every option trialpipe knows."""
    return {
        name: (str(spec["code"]), str(spec["meaning"]))
        for name, spec in load_options()["options"].items()
    }


def basic_action(row: Row) -> str | None:
    """The deid action line for a row under the Basic Profile (None: handled elsewhere)."""
    if row.masked or row.basic == "X/Z/U*":
        return None
    sequence = row.vr == "SQ"
    code = row.basic
    if sequence and code not in ("X", "Z"):
        return None  # kept: its items are cleaned attribute by attribute (see module doc)
    if code == "U" or (row.vr == "UI" and code in ("D", "X/D", "Z/D", "X/Z/D")):
        return f"REPLACE {row.selector} func:uid"
    if code == "X":
        return f"REMOVE {row.selector}"
    if code in ("Z", "X/Z"):
        return f"BLANK {row.selector}"
    if code in ("D", "X/D", "Z/D", "X/Z/D"):
        return f"REPLACE {row.selector} func:dummy"
    raise ValueError(f"Table E.1-1 row {row.tag}: unknown action code {code!r}")


def option_action(option: str, row: Row) -> str | None:
    """The deid action line a claimed option puts in place of the row's basic action."""
    spec = load_options()["options"].get(option, {})
    temporal = row.vr in DATE_VRS | {"TM"} and row.selector not in spec.get("except", [])
    if option == "retain_longitudinal_full_dates" and temporal:
        return f"KEEP {row.selector}"
    if option == "retain_longitudinal_modified_dates" and temporal:
        if row.vr == "TM":
            return f"KEEP {row.selector}"
        return f"REPLACE {row.selector} func:shift_date"
    if row.selector in spec.get("attributes", []):
        # Retained free text still loses the subject's own identifying values.
        if option == "clean_descriptors" or row.vr in TEXT_VRS:
            return f"REPLACE {row.selector} func:clean_text"
        return f"KEEP {row.selector}"
    return None


def _header(title: str) -> list[str]:
    return [
        "FORMAT dicom",
        "",
        f"# {title}",
        f"# GENERATED by `python -m pipeline.annex_e` from recipes/base/annex-e/ (PS3.15 "
        f"{edition()}, Table E.1-1). Do not edit: edit the table or options.yaml.",
        "",
        "%header",
        "",
    ]


def base_recipe_text() -> str:
    """The Basic Application Level Confidentiality Profile as a deid recipe."""
    lines = _header("Basic Application Level Confidentiality Profile (PS3.15 E.1)")
    for row in load_table():
        action = basic_action(row)
        if action:
            lines.append(f"{action}  # {row.tag} {row.name}: {row.basic}")
    lines += [
        "",
        "ADD PatientIdentityRemoved YES",
        "ADD LongitudinalTemporalInformationModified REMOVED",
    ]
    return "\n".join(lines) + "\n"


def option_recipe_text(option: str) -> str:
    """The recipe layer of one option: the rows it changes, with their new actions."""
    spec = load_options()["options"][option]
    lines = _header(f"{spec['meaning']} ({spec['code']}): {spec['action']}")
    for row in load_table():
        action = option_action(option, row)
        if action:
            lines.append(f"{action}  # {row.tag} {row.name}")
    if option == "retain_longitudinal_modified_dates":
        lines.append("ADD LongitudinalTemporalInformationModified MODIFIED")
    if option == "retain_longitudinal_full_dates":
        lines.append("ADD LongitudinalTemporalInformationModified UNMODIFIED")
    return "\n".join(lines) + "\n"


def generated_files() -> dict[Path, str]:
    """Every generated recipe file and the text it must hold."""
    base = recipes_dir() / "base"
    files = {base / "deid.dicom": base_recipe_text()}
    for option in load_options()["options"]:
        if option != "retain_safe_private":
            files[base / "options" / f"{option}.dicom"] = option_recipe_text(option)
    return files


def uncovered_rows(recipe_selectors: set[str]) -> list[Row]:
    """Rows of the table the base recipe does not act on (should be none)."""
    missing = []
    for row in load_table():
        if basic_action(row) is not None and row.selector not in recipe_selectors:
            missing.append(row)
    return missing


def main() -> None:
    for path, text in generated_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
