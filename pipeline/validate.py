"""Required-tag validation with Great Expectations, one suite per protocol and modality.

The protocol's ``required_tags`` are compiled into expectations (not-null; for a range, a
number within it; allowed set) and run on the de-identified metadata of a batch. A failure
becomes a finding with a reason code; the protocol's ``on_failure`` says whether it
quarantines the file or only flags it. Great Expectations is imported here, inside the
task, never at DAG parse time.

Each batch's validation results are rendered as GX Data Docs (HTML) under
``reports/qc/<batch>/``; the batch record and the batches table link to its index page.
GX's static assets (fonts, styles: about 4 MB) are kept once in ``reports/qc/_static``
and each batch's ``static`` is a link to it.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import deferred
from pipeline.protocol import Protocol, TagRule
from pipeline.reasons import Reason

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

# Modules Great Expectations imports when it is imported, for expectations and renderers
# trialpipe never uses (distribution tests, charts): half its import time.
_UNUSED_AT_IMPORT = ("scipy.stats", "altair")


def load() -> None:
    """Import Great Expectations (and pandas), as :func:`check_batch` does first: a caller
    may do it ahead, while other work runs."""
    deferred.defer(_UNUSED_AT_IMPORT)
    import great_expectations  # noqa: F401
    import pandas  # noqa: F401

    _compile_templates_once()


def _compile_templates_once() -> None:
    """Give each Data Docs view Jinja's bytecode cache of compiled templates.

    GX makes a new Jinja environment for every view it renders, so every batch's Data Docs
    compiled GX's fifty-odd templates again: a fifth of a second a batch, in every validate
    task. Jinja's cache (in its own private folder, one per user, under the temporary
    directory; written whole, then renamed) keys each template by its source, so a changed
    template is compiled again. It holds GX's templates only, never a rendered page.
    """
    import jinja2
    from great_expectations.render.view.view import DefaultJinjaView

    if getattr(DefaultJinjaView.__init__, "bytecode_cache", None) is not None:
        return
    try:
        cache = jinja2.FileSystemBytecodeCache()
    except (OSError, RuntimeError):
        return  # no private temporary folder: the templates are compiled, as GX does
    original = DefaultJinjaView.__init__

    @functools.wraps(original)
    def with_cache(self: DefaultJinjaView, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.env.bytecode_cache = cache

    with_cache.bytecode_cache = cache  # type: ignore[attr-defined]
    DefaultJinjaView.__init__ = with_cache  # type: ignore[method-assign]


# A finite number as :func:`normalise` writes it (Python's float repr: no inf, no nan).
NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$")


@dataclass(frozen=True)
class Finding:
    """One failed rule for one file; ``quarantine`` False means archive and flag."""

    file_no: int
    keyword: str
    reason: Reason
    quarantine: bool
    modality: str = ""
    expectation: str = ""
    observed: str | None = None

    @property
    def detail(self) -> str:
        """What failed, by attribute name and reason (never the value)."""
        return f"{self.keyword}: {self.reason.info.summary}"

    @property
    def action(self) -> str:
        return "quarantine" if self.quarantine else "flag"

    def record(self) -> dict[str, Any]:
        """The finding as the worklist carries it to the qc_findings row and the ledger."""
        return {
            "attribute": self.keyword,
            "modality": self.modality,
            "expectation": self.expectation,
            "reason": self.reason.value,
            "action": self.action,
            "observed": self.observed,
            "detail": self.detail,
        }


def normalise(value: Any) -> str | None:
    """A tag value as comparable text (numbers in one canonical form); None if empty."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        parts = [normalise(v) for v in value]
        return "\\".join(p or "" for p in parts) if any(parts) else None
    text = str(value).strip()
    if not text:
        return None
    try:
        return repr(float(text))
    except ValueError:
        return text


def first_value(value: Any) -> str | None:
    """The first value of a tag as comparable text (range rules look at the first value of a
    multi-valued attribute, e.g. the row spacing of PixelSpacing); None if empty."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return normalise(value)


def first_number(value: Any) -> float | None:
    """The first value of a tag as a finite number; None when absent or not a number."""
    text = first_value(value)
    return float(text) if text is not None and NUMBER.match(text) else None


def required_keywords(protocol: Protocol) -> set[str]:
    """Every attribute some modality's rules look at."""
    return {rule.keyword for rules in protocol.required_tags.values() for rule in rules}


def check_batch(
    protocol: Protocol,
    rows: list[dict[str, Any]],
    docs_dir: Path | None = None,
    run_name: str = "batch",
) -> list[Finding]:
    """Run the protocol's suites on metadata rows (``file_no``, ``Modality`` and the
    required keywords, raw values); return the findings. With ``docs_dir``, also render
    the results as GX Data Docs there (replacing an earlier rendering)."""
    load()
    import great_expectations as gx
    import pandas as pd
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    building = docs_dir.with_name(f".{docs_dir.name}.{uuid.uuid4().hex[:8]}") if docs_dir else None
    sites = {}
    if building is not None:
        sites["batch"] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(building),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    # In-memory stores and only our Data Docs site (the default config would also make a
    # site in a fresh temporary folder per batch, left behind).
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites=sites,
            analytics_enabled=False,
        ),
    )
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("batch")
    findings: list[Finding] = []
    for modality, rules in sorted(protocol.required_tags.items()):
        selected = [r for r in rows if str(r.get("Modality", "")) == modality]
        if not selected:
            continue
        columns: dict[str, list[Any]] = {"file_no": [r["file_no"] for r in selected]}
        for rule in rules:
            values = [r.get(rule.keyword) for r in selected]
            if _ranged(rule):
                columns[rule.keyword] = [first_value(v) for v in values]
                columns[_number_column(rule)] = [first_number(v) for v in values]
            else:
                columns[rule.keyword] = [normalise(v) for v in values]
        frame = pd.DataFrame(columns)
        suite = context.suites.add(gx.ExpectationSuite(name=f"{protocol.protocol_id}.{modality}"))
        meta: dict[tuple[str, str], tuple[TagRule, Reason]] = {}
        for rule in rules:
            for expectation, reason in _expectations(gx, rule):
                suite.add_expectation(expectation)
                meta[(expectation.expectation_type, expectation.column)] = (rule, reason)
        asset = source.add_dataframe_asset(modality)
        definition = asset.add_batch_definition_whole_dataframe(f"{modality}-rows")
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(
                name=f"{protocol.protocol_id}.{modality}", data=definition, suite=suite
            )
        )
        actions = []
        if building is not None:
            actions.append(gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["batch"]))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{run_name}.{modality}",
                validation_definitions=[validation],
                actions=actions,
                result_format={
                    "result_format": "COMPLETE",
                    "unexpected_index_column_names": ["file_no"],
                },
            )
        )
        outcome = checkpoint.run(
            batch_parameters={"dataframe": frame},
            # The run time is given: without it GX parses the run name as a date, and a
            # batch ID such as 20261125T145720-9619ad0a reads as a time zone 96 hours off.
            run_id=RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.UTC)),
        )
        for result in outcome.run_results.values():
            findings.extend(_findings(result, meta, modality))
    if building is not None and docs_dir is not None:
        _publish_docs(building, docs_dir)
    return findings


def _publish_docs(building: Path, docs_dir: Path) -> None:
    """Share the static assets, then swap the finished site into place."""
    shared = docs_dir.parent / "_static"
    static = building / "static"
    if static.is_dir():
        if not shared.exists():
            try:
                os.replace(static, shared)
            except OSError:
                shutil.rmtree(static)  # another batch published the shared copy first
        else:
            shutil.rmtree(static)
        os.symlink(os.path.relpath(shared, building), static)
    if not building.exists():
        building.mkdir(parents=True)
    old = docs_dir.with_name(f".{docs_dir.name}.old-{uuid.uuid4().hex[:8]}")
    if docs_dir.exists():
        os.replace(docs_dir, old)
    os.replace(building, docs_dir)
    shutil.rmtree(old, ignore_errors=True)


def _ranged(rule: TagRule) -> bool:
    return rule.min is not None or rule.max is not None


def _number_column(rule: TagRule) -> str:
    """The column a range rule compares: the attribute's first value as a number."""
    return f"{rule.keyword} (number)"


def _expectations(gx: Any, rule: TagRule) -> list[tuple[Any, Reason]]:
    """The rule as expectations, each with the reason its failure carries. A range rule
    first checks that its attribute is a number, so a value present but not a number is
    out of range, not missing."""
    column = rule.keyword
    made = [
        (gx.expectations.ExpectColumnValuesToNotBeNull(column=column), Reason.MISSING_REQUIRED_TAG)
    ]
    if _ranged(rule):
        made.append(
            (
                gx.expectations.ExpectColumnValuesToMatchRegex(
                    column=column,
                    regex=NUMBER.pattern,
                    description=f"values of {column} must be numbers",
                ),
                Reason.VALUE_OUT_OF_RANGE,
            )
        )
        made.append(
            (
                gx.expectations.ExpectColumnValuesToBeBetween(
                    column=_number_column(rule), min_value=rule.min, max_value=rule.max
                ),
                Reason.VALUE_OUT_OF_RANGE,
            )
        )
    if rule.allowed:
        made.append(
            (
                gx.expectations.ExpectColumnValuesToBeInSet(
                    column=column, value_set=sorted({normalise(a) for a in rule.allowed})
                ),
                Reason.VALUE_OUT_OF_RANGE,
            )
        )
    return made


def _findings(
    result: Any, meta: dict[tuple[str, str], tuple[TagRule, Reason]], modality: str
) -> list[Finding]:
    found: list[Finding] = []
    for item in result.results:
        column = item.expectation_config.kwargs.get("column")
        kind = item.expectation_config.type
        if item.success or (kind, column) not in meta:
            continue
        rule, reason = meta[(kind, column)]
        for unexpected in item.result.get("unexpected_index_list") or []:
            found.append(
                Finding(
                    int(unexpected["file_no"]),
                    rule.keyword,
                    reason,
                    rule.on_failure != "flag",
                    modality,
                    kind,
                    _observed(unexpected.get(column)),
                )
            )
    return found


def _observed(value: Any) -> str | None:
    """The failing value as text (de-identified metadata); None for a missing value."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value)
