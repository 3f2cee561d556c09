"""Quality at commit: a dataset's validation suite, and poisoning signals against the parent.

A **validation suite** declares what a version's files must look like. It lives in the file
``shipyard-checks.yaml`` at the root of the committed folder (:data:`SUITE_FILE`), which is
committed with the data like any other file - so a version carries the suite it was checked
against, a checkout brings it back, and a commit through the server checks exactly what an
embedded commit checks (the server reads it from the uploaded files). The SDK can pass one
instead (``client.datasets.commit(..., checks=...)``); a commit may not have both. Example::

    tables:
      - files: "tables/*.csv"          # gitignore-style glob over the version's paths
        severity: error                # error (default): a failure refuses the commit
        rows: {min: 100}
        strict: true                   # no columns beyond those declared
        label: species                 # the label column, for the label-shift signal
        unique: [id, day]              # these columns together identify a row
        columns:
          id: {type: int, nullable: false, unique: true}
          age: {type: number, min: 0, max: 130, max_null_rate: 0.05}
          species: {type: str, allowed: [setosa, versicolor, virginica]}
          email: {type: str, pattern: "[^@]+@[^@]+"}   # must match the whole value
      - files: "tables/*.csv"          # a second block for the same files: warnings only
        severity: warning
        columns:
          age: {max: 90}
    images:
      - files: "images/**/*.png"
        formats: [png]                 # png, jpeg
        width: {min: 8, max: 4096}
        height: {min: 8, max: 4096}
        bytes: {max: 10000000}
    signals:                           # poisoning signals; each can be `false`
      severity: warning
      label_shift: {p_value: 0.001, min_shift: 0.05}
      duplicates: {max_increase: 0.01, p_value: 0.001, decimals: 3}
      out_of_range: {margin: 0.1, max_fraction: 0.01, min_rows: 30}

Column keys: ``type`` (int, float, number, str, bool, date, timestamp - checked on the stored
Arrow type), ``required`` (default true), ``nullable`` (default true), ``max_null_rate`` (0..1,
NaN counts as null), ``min``/``max`` (numbers, inclusive), ``allowed`` (a list of values),
``unique``, ``pattern`` (a Python regular expression that must match the whole value). Table keys:
``files``, ``severity``, ``columns``, ``strict``, ``rows`` (min/max row count), ``unique`` (a
column combination), ``label``. Image keys: ``files``, ``severity``, ``formats``, ``width``,
``height`` (pixels), ``bytes`` (file size), ``decode`` (default true: decode the pixels, not only
the header). A block whose glob matches no file fails at its severity (a likely typo). Unknown
keys, wrong types and duplicated keys are errors that name the file and line.

Each check has a **severity**. A failed ``error`` check refuses the commit with an
:class:`InvalidInputError` whose message and ``details["failures"]`` (the first 100 of
``details["failed_checks"]``) list the failed checks with their counts and first failing rows
(positions from 0, with their values); nothing is stored as a version. A failed ``warning``
check is recorded on the version as a failed :class:`ValidationResult`; passed checks are
recorded too. Check names say what they are: ``quality.<kind>:<path>[:<column>]`` for the suite,
``quality.image.<kind>:<glob>`` for images, ``signal.<kind>:<path>`` for poisoning signals
(every failed result of these kinds stored on a version is therefore a warning: errors never
reach the store).

**Poisoning signals** compare each table that changed with the table at the same path in the
parent version (the dataset's previous version):

- ``label_shift``: a chi-square test of homogeneity on the declared ``label`` column's counts,
  flagged when significant (``p_value``) *and* large (total variation ``min_shift``);
- ``duplicates``: a jump in exact or near-duplicate rows (near: strings lower-cased and
  whitespace-collapsed, floats rounded to ``decimals``, the label and the identifier columns left
  out - so the same features under a flipped label, or copies given fresh ids, count). Rates are
  compared at equal size (the larger table sampled down) and the rise must exceed
  ``max_increase`` and be significant (``p_value``), since chance repeats grow with size alone;
- ``out_of_range``: rows with a value outside the parent's observed range of a numeric column,
  widened by ``margin`` times that range, flagged above ``max_fraction`` of the rows (and above
  what the parent's row count leads to expect; a parent under ``min_rows`` rows bounds nothing).

Identifier columns - declared ``unique``, or integer and string columns whose values are all
distinct - are not compared for ranges (a growing id is not an outlier). The signals run on every
commit that has a parent, with a suite or without one (the label shift needs a declared label),
and read the parent's rows only when a signal needs them (its stored profile gives the ranges).

Table checks run through pandera (schema types are checked on the Arrow schema, which is what
the version stores: pandas' dtypes would tell int32 from int64, or an integer column with nulls
from a float one); images through Pillow. Both, and pandas and SciPy, are imported only when a
suite or a signal needs them, so a commit without tables pays nothing for them.
"""

from __future__ import annotations

import enum
import io
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np
import pathspec
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shipyard.context import Context
from shipyard.data.profile import (
    Progress,
    TableRead,
    is_table,
    profile_table,
    read_table,
    readable_checks,
)
from shipyard.domain.models import DatasetProfile, FileEntry, TableProfile, ValidationResult
from shipyard.errors import InvalidInputError

__all__ = [
    "REPORT_ROWS",
    "SUITE_FILE",
    "Bounds",
    "CheckResult",
    "ColumnChecks",
    "DuplicatesSignal",
    "ImageChecks",
    "LabelShiftSignal",
    "OutOfRangeSignal",
    "ParentTable",
    "Severity",
    "Signals",
    "Suite",
    "TableChecks",
    "check_images",
    "check_table",
    "inspect",
    "load_suite",
    "parse_suite",
    "signals",
    "suite_for",
]

SUITE_FILE = "shipyard-checks.yaml"
"""The suite's file name, at the root of a committed folder (committed with the data)."""

REPORT_ROWS = 5
"""How many failing rows (or files) a failed check reports, first by position."""

_REPORT_COLUMNS = 12
_SUITE_MAX_BYTES = 1024 * 1024
_MAX_SHOWN_ERRORS = 5
_MAX_REPORTED = 100  # failed checks in an error's details (a bound on the response's size)


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"


# --- the suite ----------------------------------------------------------------------------------


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bounds(_Spec):
    """An inclusive range; either end may be left open."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


ColumnType = Literal["int", "float", "number", "str", "bool", "date", "timestamp"]


class ColumnChecks(_Spec):
    """What one column must hold. A declared column must exist unless ``required: false``."""

    type: ColumnType | None = None
    required: bool = True
    nullable: bool = True
    max_null_rate: float | None = Field(default=None, ge=0, le=1)
    min: float | None = None
    max: float | None = None
    allowed: list[str | int | float | bool] | None = None
    unique: bool = False
    pattern: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _ordered(self) -> ColumnChecks:
        Bounds(min=self.min, max=self.max)  # raises when min > max
        return self


class _Block(_Spec):
    files: str = Field(min_length=1)
    severity: Severity = Severity.ERROR

    @field_validator("files")
    @classmethod
    def _glob(cls, value: str) -> str:
        try:
            pathspec.GitIgnoreSpec.from_lines([value])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a glob: {exc}") from None
        return value

    def matches(self, path: str) -> bool:
        return _spec(self.files).match_file(path)


class TableChecks(_Block):
    """Checks for the CSV and Parquet files that ``files`` matches."""

    columns: dict[str, ColumnChecks] = Field(default_factory=dict)
    strict: bool = False
    rows: Bounds | None = None
    unique: list[str] | None = Field(default=None, min_length=1)
    label: str | None = None


class ImageChecks(_Block):
    """Checks for the image files that ``files`` matches: each decodes and is within bounds."""

    formats: list[Literal["png", "jpeg"]] | None = Field(default=None, min_length=1)
    width: Bounds | None = None
    height: Bounds | None = None
    bytes: Bounds | None = None
    decode: bool = True


class LabelShiftSignal(_Spec):
    p_value: float = Field(default=0.001, gt=0, lt=1)
    min_shift: float = Field(default=0.05, ge=0, le=1)  # total variation distance


class DuplicatesSignal(_Spec):
    max_increase: float = Field(default=0.01, ge=0, le=1)  # in fraction of rows
    p_value: float = Field(default=0.001, gt=0, lt=1)  # the increase must be significant too
    decimals: int = Field(default=3, ge=0, le=12)  # rounding of floats for near-duplicates


class OutOfRangeSignal(_Spec):
    margin: float = Field(default=0.1, ge=0)  # times the parent's range, on each side
    max_fraction: float = Field(default=0.01, ge=0, le=1)
    min_rows: int = Field(default=30, ge=1)  # fewer rows in the parent bound no range


class Signals(_Spec):
    """The poisoning signals, each ``false`` to turn it off."""

    severity: Severity = Severity.WARNING
    label_shift: LabelShiftSignal | None = LabelShiftSignal()
    duplicates: DuplicatesSignal | None = DuplicatesSignal()
    out_of_range: OutOfRangeSignal | None = OutOfRangeSignal()

    @field_validator("label_shift", "duplicates", "out_of_range", mode="before")
    @classmethod
    def _on_off(cls, value: Any) -> Any:
        return {} if value is True else (None if value is False else value)


class Suite(_Spec):
    """A dataset's validation suite (the content of ``shipyard-checks.yaml``)."""

    version: Literal[1] = 1
    tables: list[TableChecks] = Field(default_factory=list)
    images: list[ImageChecks] = Field(default_factory=list)
    signals: Signals = Signals()


def parse_suite(text: str, *, source: str = SUITE_FILE) -> Suite:
    """Parse a suite from YAML text; ``source`` names it in errors.

    A suite that does not parse raises :class:`InvalidInputError` (field ``checks``) naming
    ``source``, the line, the setting and what is wrong with it.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            start = exc.context_mark
            what += f" ({exc.context} started at line {start.line + 1}, column {start.column + 1})"
        line = mark.line + 1 if mark else None
        raise _suite_error(f"{source}{where}: {what}", source=source, line=line) from None
    except yaml.YAMLError as exc:
        raise _suite_error(f"{source}: {exc}", source=source, line=None) from None
    if root is None:
        raise _suite_error(
            f"{source}, line 1: the suite is empty (declare tables:, images: or signals:)",
            source=source,
            line=1,
        )
    _refuse_duplicate_keys(root, source=source)
    if not isinstance(data, dict):
        raise _suite_error(
            f"{source}, line 1: the suite must be a mapping (tables:, images:, signals:)",
            source=source,
            line=1,
        )
    return _validate(data, source=source, node=root)


def load_suite(value: Suite | Mapping[str, Any] | str | Path) -> Suite:
    """A suite from what the SDK accepts: a :class:`Suite`, a mapping of the YAML's structure,
    or the path of a YAML file."""
    if isinstance(value, Suite):
        return value
    if isinstance(value, Mapping):
        return _validate(dict(value), source="checks", node=None)
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            f"checks: cannot read the suite file {str(path)!r}: {exc}", field="checks"
        ) from None
    return parse_suite(text, source=str(path))


def suite_for(
    ctx: Context, entries: Sequence[FileEntry], *, checks: Suite | None = None
) -> Suite | None:
    """The suite a commit of ``entries`` runs: ``checks`` (from the SDK), else the version's
    :data:`SUITE_FILE`, else none. Both at once is refused: which one applies would be a guess."""
    entry = next((e for e in entries if e.path == SUITE_FILE), None)
    if entry is None:
        return checks
    if checks is not None:
        raise InvalidInputError(
            f"checks were given and the files also hold {SUITE_FILE}: give the suite one way "
            f"(remove {SUITE_FILE}, or leave out checks=), then commit again",
            field="checks",
        )
    if entry.size > _SUITE_MAX_BYTES:
        raise _suite_error(
            f"{SUITE_FILE}: {entry.size} bytes, above the {_SUITE_MAX_BYTES} a suite may have",
            source=SUITE_FILE,
            line=None,
        )
    try:
        text = ctx.blobs.get_bytes(entry.digest).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _suite_error(
            f"{SUITE_FILE}: not UTF-8 text (byte {exc.start})", source=SUITE_FILE, line=None
        ) from None
    return parse_suite(text, source=SUITE_FILE)


# --- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome. ``rows`` are the first failing rows (``{"row": i, "values": {...}}``)
    or, for images, files (``{"path": p, "values": {...}}``); ``count`` is how many failed."""

    check: str
    severity: Severity
    passed: bool
    message: str
    count: int = 0
    rows: tuple[dict[str, Any], ...] = ()

    def to_validation(self) -> ValidationResult:
        return ValidationResult(check=self.check, passed=self.passed, message=self.message)

    def to_report(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity.value,
            "message": self.message,
            "count": self.count,
            "rows": list(self.rows),
        }


def _ok(check: str, severity: Severity, message: str) -> CheckResult:
    return CheckResult(check=check, severity=severity, passed=True, message=message)


def _failed(
    check: str,
    severity: Severity,
    message: str,
    *,
    count: int = 1,
    rows: Iterable[dict[str, Any]] = (),
) -> CheckResult:
    return CheckResult(check, severity, False, message, count, tuple(rows))


# --- the commit's inspection --------------------------------------------------------------------


def inspect(
    ctx: Context,
    entries: Sequence[FileEntry],
    *,
    suite: Suite | None,
    parent_files: Sequence[FileEntry] = (),
    known: Mapping[str, TableProfile] | None = None,
    progress: Progress | None = None,
) -> tuple[DatasetProfile, list[ValidationResult]]:
    """Profile, validate and compare a commit's files; return the profile and the results to
    record on the version, or raise :class:`InvalidInputError` when an ``error`` check failed.

    ``known`` maps digests to profiles already computed (the parent's): an unchanged table is
    read again only when the suite has checks for it. ``parent_files`` are the parent version's
    files, for the poisoning signals.
    """
    suite_ = suite or Suite()
    cache: dict[str, TableProfile] = dict(known or {})
    unreadable: dict[str, str] = {}
    parents = {f.path: f for f in parent_files if is_table(f.path)}
    total = sum(e.size for e in entries)
    done = 0
    tables: list[TableProfile] = []
    validation: list[ValidationResult] = []
    results: list[CheckResult] = []
    for entry in entries:
        if is_table(entry.path):
            blocks = [b for b in suite_.tables if b.matches(entry.path)]
            parent = parents.get(entry.path)
            compare = parent is not None and parent.digest != entry.digest
            profile = cache.get(entry.digest)
            read: TableRead | None = None
            if (profile is None and entry.digest not in unreadable) or blocks or compare:
                read = read_table(ctx, entry)
                if read.table is not None and profile is None:
                    profile = cache[entry.digest] = profile_table(read.table, path="")
                elif read.table is None:
                    unreadable[entry.digest] = read.error or ""
            if profile is not None:
                profile = profile.model_copy(update={"path": entry.path})
                tables.append(profile)
            validation.extend(readable_checks(entry.path, profile, unreadable.get(entry.digest)))
            if read is not None:
                old = parent if compare else None
                old_profile = cache.get(old.digest) if old is not None else None
                results.extend(_table_results(ctx, read, blocks, old, old_profile, profile, suite_))
        done += entry.size
        if progress is not None:
            progress(done, total, entry.path)
    results.extend(check_images(ctx, entries, suite_.images))
    results.extend(_unmatched(entries, suite_))
    _refuse_errors(results)
    validation.extend(r.to_validation() for r in results)
    return DatasetProfile(files=len(entries), bytes=total, tables=tables), validation


def _table_results(
    ctx: Context,
    read: TableRead,
    blocks: list[TableChecks],
    parent: FileEntry | None,
    parent_profile: TableProfile | None,
    new_profile: TableProfile | None,
    suite: Suite,
) -> list[CheckResult]:
    if read.table is None:
        return [
            _failed(f"quality.readable:{read.path}", b.severity, read.error or "unreadable")
            for b in blocks
        ]
    results = [r for b in blocks for r in check_table(read.table, path=read.path, block=b)]
    if parent is not None:
        results.extend(
            signals(
                read.table,
                lambda: read_table(ctx, parent).table,
                path=read.path,
                label=next((b.label for b in blocks if b.label), None),
                spec=suite.signals,
                old_profile=parent_profile,
                new_profile=new_profile,
                identifiers={c for b in blocks for c, spec in b.columns.items() if spec.unique},
            )
        )
    return results


def _unmatched(entries: Sequence[FileEntry], suite: Suite) -> Iterator[CheckResult]:
    """A block whose glob matches no file checked nothing: most likely a typo, so it fails."""
    for kind, blocks, wanted in (
        ("tables", suite.tables, is_table),
        ("images", suite.images, _is_image),
    ):
        for i, block in enumerate(blocks):
            if not any(wanted(e.path) and block.matches(e.path) for e in entries):
                yield _failed(
                    f"quality.matches:{block.files}",
                    block.severity,
                    f"{kind}[{i}].files {block.files!r} matches no file of this version",
                )


def _refuse_errors(results: list[CheckResult]) -> None:
    errors = [r for r in results if not r.passed and r.severity is Severity.ERROR]
    if not errors:
        return
    lines = [f"  {r.check}: {r.message}" for r in errors[:20]]
    if len(errors) > 20:
        lines.append(f"  ... and {len(errors) - 20} more (see details.failures)")
    raise InvalidInputError(
        f"{len(errors)} validation check(s) of severity error failed; nothing was committed:\n"
        + "\n".join(lines)
        + f"\nfix the data (or the suite, {SUITE_FILE}) and commit again",
        field="files",
        failures=[r.to_report() for r in errors[:_MAX_REPORTED]],
        failed_checks=len(errors),
    )


# --- tables -------------------------------------------------------------------------------------


def check_table(table: pa.Table, *, path: str, block: TableChecks) -> list[CheckResult]:
    """Run one block's checks on ``table`` (the file at ``path``); every check gives a result."""
    sev = block.severity
    results = _schema_results(table, path=path, block=block)
    if block.rows is not None:
        check = f"quality.rows:{path}"
        rows = block.rows.describe()
        results.append(
            _ok(check, sev, f"{table.num_rows} rows, within {rows}")
            if block.rows.holds(table.num_rows)
            else _failed(check, sev, f"{table.num_rows} rows, expected {rows}", count=1)
        )
    results.extend(_pandera_results(table, path=path, block=block))
    return results


def _schema_results(table: pa.Table, *, path: str, block: TableChecks) -> list[CheckResult]:
    sev = block.severity
    have = set(table.column_names)
    missing = [c for c, spec in block.columns.items() if spec.required and c not in have]
    missing += [c for c in block.unique or [] if c not in have and c not in missing]
    extra = [c for c in table.column_names if c not in block.columns] if block.strict else []
    problems = []
    if missing:
        problems.append(f"missing columns: {', '.join(missing)}")
    if extra:
        problems.append(f"columns the suite does not declare (strict): {', '.join(extra)}")
    check = f"quality.schema:{path}"
    results = [
        _failed(check, sev, "; ".join(problems), count=len(missing) + len(extra))
        if problems
        else _ok(check, sev, f"{len(table.column_names)} columns as declared")
    ]
    for name, spec in block.columns.items():
        if spec.type is None or name not in have:
            continue
        kind = _value_type(table.schema.field(name).type)
        check = f"quality.type:{path}:{name}"
        results.append(
            _ok(check, sev, f"{kind} is {spec.type}")
            if _TYPE_TESTS[spec.type](kind)
            else _failed(check, sev, f"column {name!r} is {kind}, the suite declares {spec.type}")
        )
    return results


@dataclass
class _Planned:
    """One pandera check and the result it stands for."""

    check: str
    column: str | None
    failed: str  # "N rows <failed>"
    passed: str  # "all N rows <passed>"
    indices: set[int] = field(default_factory=set)
    count: int = 0
    hit: bool = False


def _pandera_results(table: pa.Table, *, path: str, block: TableChecks) -> list[CheckResult]:
    import pandera.pandas as pdr

    sev = block.severity
    planned: dict[tuple[str | None, str], _Planned] = {}
    columns: dict[str, Any] = {}
    results: list[CheckResult] = []
    for name, spec in block.columns.items():
        if name not in table.column_names:
            continue
        kind = _value_type(table.schema.field(name).type)
        checks, plans, misfits = _column_checks(pdr, path, name, spec, kind, sev)
        results.extend(misfits)
        for number, plan in enumerate(plans):
            planned[(name, str(number))] = plan
        if not spec.nullable:
            planned[(name, "not_nullable")] = _Planned(
                f"quality.nulls:{path}:{name}", name, "null (declared nullable: false)", "not null"
            )
        if spec.unique:
            planned[(name, "field_uniqueness")] = _Planned(
                f"quality.unique:{path}:{name}", name, "with a repeated value", "unique"
            )
        columns[name] = pdr.Column(None, checks=checks, nullable=spec.nullable, unique=spec.unique)
    combo = block.unique if block.unique and set(block.unique) <= set(table.column_names) else None
    if combo:
        planned[(None, "multiple_fields_uniqueness")] = _Planned(
            f"quality.unique:{path}:{'+'.join(combo)}",
            None,
            f"repeating ({', '.join(combo)})",
            f"unique by ({', '.join(combo)})",
        )
        columns.update({c: pdr.Column(None, nullable=True) for c in combo if c not in columns})
    if not columns:
        return results
    frame = _to_pandas(table.select(list(columns)))
    schema = pdr.DataFrameSchema(columns, unique=combo, coerce=False, strict=False)
    try:
        schema.validate(frame, lazy=True)
    except pdr.errors.SchemaErrors as exc:
        _collect(exc.failure_cases, planned, table)
    for plan in planned.values():
        results.append(_plan_result(plan, table, sev))
    return results


def _column_checks(
    pdr: Any, path: str, name: str, spec: ColumnChecks, kind: pa.DataType, sev: Severity
) -> tuple[list[Any], list[_Planned], list[CheckResult]]:
    """The pandera checks of one column, each with its plan; checks that cannot apply to the
    column's type fail on their own (``misfits``) instead of raising inside pandera."""
    numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    checks: list[Any] = []
    plans: list[_Planned] = []
    misfits: list[CheckResult] = []
    if spec.min is not None or spec.max is not None:
        bounds = Bounds(min=spec.min, max=spec.max)
        check = f"quality.range:{path}:{name}"
        if not numeric:
            misfits.append(_failed(check, sev, f"min/max need numbers; column {name!r} is {kind}"))
        else:
            checks.append(
                pdr.Check(lambda s, b=bounds: _in_bounds(s, b), name="range", ignore_na=True)
            )
            within = bounds.describe()
            plans.append(_Planned(check, name, f"outside {within}", f"within {within}"))
    if spec.allowed is not None:
        checks.append(pdr.Check.isin(spec.allowed))
        shown = _short(", ".join(map(str, spec.allowed)))
        plans.append(
            _Planned(
                f"quality.allowed:{path}:{name}",
                name,
                f"not in the allowed values ({shown})",
                f"in the allowed values ({shown})",
            )
        )
    if spec.pattern is not None:
        check = f"quality.pattern:{path}:{name}"
        if not text:
            misfits.append(_failed(check, sev, f"pattern needs strings; column {name!r} is {kind}"))
        else:
            checks.append(pdr.Check.str_matches(f"(?:{spec.pattern})\\Z"))
            plans.append(
                _Planned(check, name, f"not matching {spec.pattern!r}", f"match {spec.pattern!r}")
            )
    if spec.max_null_rate is not None:
        rate = spec.max_null_rate
        checks.append(
            pdr.Check(
                lambda s, r=rate: len(s) == 0 or float(s.isna().mean()) <= r,
                element_wise=False,
                ignore_na=False,
                name="max_null_rate",
            )
        )
        plans.append(
            _Planned(
                f"quality.null_rate:{path}:{name}",
                name,
                f"null, above the allowed rate {rate:.2%}",
                f"null rate within {rate:.2%}",
            )
        )
    return checks, plans, misfits


def _collect(
    failures: Any, planned: dict[tuple[str | None, str], _Planned], table: pa.Table
) -> None:
    for record in failures.itertuples(index=False):
        column = None if _missing(record.column) else str(record.column)
        key: tuple[str | None, str]
        if record.check in ("not_nullable", "field_uniqueness"):
            key = (column, str(record.check))
        elif record.check == "multiple_fields_uniqueness":
            key = (None, "multiple_fields_uniqueness")
        elif not _missing(record.check_number) and column is not None:
            key = (column, str(int(record.check_number)))
        else:
            key = (column, f"pandera:{record.check}")
            planned.setdefault(
                key, _Planned(f"quality.{record.check}:{column}", column, str(record.check), "")
            )
        plan = planned.get(key)
        if plan is None:
            continue
        plan.hit = True
        if not _missing(record.index):
            plan.indices.add(int(record.index))
    for plan in planned.values():
        if plan.hit and plan.check.startswith("quality.null_rate:") and plan.column is not None:
            column = table.column(plan.column)
            nulls = pc.is_null(column, nan_is_null=True)
            plan.indices = set(pc.indices_nonzero(nulls).to_pylist())


def _plan_result(plan: _Planned, table: pa.Table, severity: Severity) -> CheckResult:
    n = table.num_rows
    if not plan.hit:
        return _ok(plan.check, severity, f"all {n} rows {plan.passed}")
    count = len(plan.indices) or 1
    rows = _rows(table, sorted(plan.indices)[:REPORT_ROWS], focus=plan.column)
    if plan.check.startswith("quality.null_rate:"):
        message = f"{len(plan.indices)} of {n} rows ({len(plan.indices) / max(n, 1):.2%}) "
        message += f"{plan.failed}"
    else:
        message = f"{count} of {n} rows {plan.failed}"
    return _failed(
        plan.check, severity, message + _shown(rows, plan.column), count=count, rows=rows
    )


# --- images -------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}


def check_images(
    ctx: Context, entries: Sequence[FileEntry], blocks: Sequence[ImageChecks]
) -> list[CheckResult]:
    """Each block's checks over the image files it matches: one result per check and block, with
    the first failing files."""
    results: list[CheckResult] = []
    for block in blocks:
        matched = [e for e in entries if _is_image(e.path) and block.matches(e.path)]
        if matched:
            results.extend(_image_block(ctx, matched, block))
    return results


def _image_block(ctx: Context, files: list[FileEntry], block: ImageChecks) -> list[CheckResult]:
    kinds = {
        "decodable": True,  # the header always; the pixels too unless decode: false
        "format": block.formats is not None,
        "width": block.width is not None,
        "height": block.height is not None,
        "bytes": block.bytes is not None,
    }
    failing: dict[str, list[dict[str, Any]]] = {k: [] for k, on in kinds.items() if on}
    for entry in files:
        facts = _image_facts(ctx.blobs.get_bytes(entry.digest), decode=block.decode)
        facts["bytes"] = entry.size
        for kind, problem in _image_problems(facts, block).items():
            if kind in failing:
                failing[kind].append({"path": entry.path, "values": facts, "problem": problem})
    results = []
    for kind, bad in failing.items():
        check = f"quality.image.{kind}:{block.files}"
        if not bad:
            results.append(_ok(check, block.severity, f"all {len(files)} images pass"))
            continue
        shown = "; ".join(f"{b['path']}: {b['problem']}" for b in bad[:REPORT_ROWS])
        more = ", ..." if len(bad) > REPORT_ROWS else ""
        results.append(
            _failed(
                check,
                block.severity,
                f"{len(bad)} of {len(files)} images fail: {shown}{more}",
                count=len(bad),
                rows=bad[:REPORT_ROWS],
            )
        )
    return results


def _image_facts(data: bytes, *, decode: bool) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                facts: dict[str, Any] = {
                    "format": _FORMATS.get(image.format or "", (image.format or "?").lower()),
                    "width": image.width,
                    "height": image.height,
                }
                if decode:
                    image.load()
                return facts
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exc:
        return {"error": (str(exc).strip() or type(exc).__name__)[:200]}


def _image_problems(facts: dict[str, Any], block: ImageChecks) -> dict[str, str]:
    if "error" in facts:
        return {"decodable": f"cannot be decoded: {facts['error']}"}
    problems: dict[str, str] = {}
    if block.formats is not None and facts["format"] not in block.formats:
        problems["format"] = f"is {facts['format']}, allowed: {', '.join(block.formats)}"
    for kind in ("width", "height", "bytes"):
        bounds: Bounds | None = getattr(block, kind)
        if bounds is not None and not bounds.holds(facts[kind]):
            problems[kind] = f"{kind} {facts[kind]} outside {bounds.describe()}"
    return problems


def _is_image(path: str) -> bool:
    return path.lower().endswith(_IMAGE_SUFFIXES)


# --- poisoning signals --------------------------------------------------------------------------

ParentTable: TypeAlias = "pa.Table | Callable[[], pa.Table | None]"
"""The parent's table, or a function that loads it (``None``: unreadable)."""


def signals(
    new: pa.Table,
    old: ParentTable,
    *,
    path: str,
    label: str | None = None,
    spec: Signals | None = None,
    old_profile: TableProfile | None = None,
    new_profile: TableProfile | None = None,
    identifiers: Iterable[str] = (),
) -> list[CheckResult]:
    """Compare table ``new`` with the parent version's table at the same ``path``: label shift
    (when ``label`` is given), a jump in duplicates, rows out of the parent's ranges.

    ``old`` may be a loader: it is called at most once, and only when a signal needs the parent's
    rows (a declared label; a duplicate rate in ``new`` above the allowed increase), so a clean
    commit with ``old_profile`` (the parent's stored profile) reads nothing of the parent. Columns
    that identify rows - ``identifiers``, and integer or string columns whose values in ``new``
    are all distinct - are left out of the near-duplicate key and the range check (a growing id
    is not an outlier, and fresh ids must not hide copied rows).
    """
    spec = spec or Signals()
    parent = _Parent(old, old_profile)
    ids = set(identifiers) | _distinct_columns(new, new_profile)
    results: list[CheckResult] = []
    if spec.label_shift is not None and label is not None:
        results.append(_label_shift(new, parent, path, label, spec.label_shift, spec.severity))
    if spec.duplicates is not None:
        skip = ids | ({label} if label else set())
        results.append(_duplicates(new, parent, path, skip, spec.duplicates, spec.severity))
    if spec.out_of_range is not None:
        results.append(_out_of_range(new, parent, path, ids, spec.out_of_range, spec.severity))
    return results


class _Parent:
    """The parent's table, loaded on first use; its profile, from the store or computed."""

    def __init__(self, old: ParentTable, profile: TableProfile | None) -> None:
        self._load = None if isinstance(old, pa.Table) else old
        self._table: pa.Table | None = old if isinstance(old, pa.Table) else None
        self._profile = profile

    def table(self) -> pa.Table | None:
        if self._load is not None:
            self._table, self._load = self._load(), None
        return self._table

    def profile(self) -> TableProfile | None:
        if self._profile is None and (table := self.table()) is not None:
            self._profile = profile_table(table, path="")
        return self._profile


def _label_shift(
    new: pa.Table,
    parent: _Parent,
    path: str,
    label: str,
    spec: LabelShiftSignal,
    severity: Severity,
) -> CheckResult:
    check = f"signal.label_shift:{path}"
    old = parent.table()
    if old is None or label not in new.column_names or label not in old.column_names:
        return _ok(check, severity, f"not computed: label column {label!r} is not in both versions")
    now, before = _counts(new.column(label)), _counts(old.column(label))
    labels = sorted(now.keys() | before.keys())
    n_now, n_before = sum(now.values()), sum(before.values())
    if len(labels) < 2 or not n_now or not n_before:
        return _ok(check, severity, f"not computed: fewer than 2 labels in {label!r}")
    from scipy.stats import chi2_contingency

    table = [[now.get(k, 0) for k in labels], [before.get(k, 0) for k in labels]]
    p_value = float(chi2_contingency(table).pvalue)
    shift = 0.5 * sum(abs(now.get(k, 0) / n_now - before.get(k, 0) / n_before) for k in labels)
    changes = ", ".join(
        f"{k} {before.get(k, 0) / n_before:.0%} -> {now.get(k, 0) / n_now:.0%}" for k in labels[:8]
    )
    message = (
        f"label {label!r} vs parent: chi-square p={p_value:.2g}, shift {shift:.1%} ({changes})"
    )
    if p_value < spec.p_value and shift >= spec.min_shift:
        return _failed(check, severity, f"distribution shifted: {message}", count=n_now)
    return _ok(check, severity, message)


def _counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column.drop_null()).to_pylist()
    return {str(c["values"]): int(c["counts"]) for c in counts}


def _duplicates(
    new: pa.Table,
    parent: _Parent,
    path: str,
    skip: set[str],
    spec: DuplicatesSignal,
    severity: Severity,
) -> CheckResult:
    """Exact duplicates compare whole rows; near-duplicates the normalised rows without ``skip``
    (the label and the identifiers). Rates are compared at equal size - the larger table is
    sampled down to the smaller one's rows - because chance repeats grow with the row count
    alone. The parent is read only if ``new``'s own rate could make a jump."""
    check = f"signal.duplicates:{path}"
    try:
        near_new = _normalised(new, skip, spec.decimals)
        exact_now, near_now = _repeat_count(new), _repeat_count(near_new)
        n_now = max(new.num_rows, 1)
        if max(exact_now, near_now) / n_now <= spec.max_increase:  # no jump possible
            return _ok(
                check,
                severity,
                f"duplicate rows {exact_now / n_now:.1%} ({exact_now}), "
                f"near-duplicates {near_now / n_now:.1%} ({near_now})",
            )
        old = parent.table()
        if old is None:
            return _ok(check, severity, "not computed: the parent's table cannot be read")
        near_old = _normalised(old, skip, spec.decimals)
        size = max(min(new.num_rows, old.num_rows), 1)
        exact = (_rate(old, size), _rate(new, size))
        near = (_rate(near_old, size), _rate(near_new, size))
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        return _ok(check, severity, f"not computed: {str(exc).splitlines()[0]}")
    message = (
        f"duplicate rows {exact[0]:.1%} -> {exact[1]:.1%} ({exact_now} in all), near-duplicates "
        f"{near[0]:.1%} -> {near[1]:.1%} ({near_now} in all) vs parent, at {size} rows each"
    )
    if _jump(exact, size, spec):
        rows = _rows(new, _repeat_positions(new)[:REPORT_ROWS])
        return _failed(
            check, severity, f"jump in {message}" + _shown(rows), count=exact_now, rows=rows
        )
    if _jump(near, size, spec):
        rows = _rows(new, _repeat_positions(near_new)[:REPORT_ROWS])
        return _failed(
            check, severity, f"jump in {message}" + _shown(rows), count=near_now, rows=rows
        )
    return _ok(check, severity, message)


def _jump(rates: tuple[float, float], size: int, spec: DuplicatesSignal) -> bool:
    """Whether the repeat rate rose by more than ``max_increase`` and more than chance explains
    (a one-sided two-proportion z-test at ``size`` rows each: small samples are noisy)."""
    before, now = rates
    if now - before <= spec.max_increase:
        return False
    pooled = (before + now) / 2
    spread = math.sqrt(pooled * (1 - pooled) * 2 / size)
    if spread == 0:
        return True
    return 0.5 * math.erfc((now - before) / spread / math.sqrt(2)) < spec.p_value


def _rate(table: pa.Table, size: int) -> float:
    """The share of repeated rows in ``size`` rows of ``table`` (a fixed random sample, so the
    same commit gives the same result)."""
    if table.num_rows > size:
        rng = np.random.default_rng(0)
        picked = np.sort(rng.choice(table.num_rows, size=size, replace=False))
        table = table.take(pa.array(picked))
    return _repeat_count(table) / size


def _repeat_count(table: pa.Table) -> int:
    """How many rows repeat an earlier row (all columns compared; nulls equal each other)."""
    if table.num_columns == 0 or table.num_rows == 0:
        return 0
    unique = table.group_by(table.column_names).aggregate([])
    return int(table.num_rows - unique.num_rows)


def _repeat_positions(table: pa.Table) -> list[int]:
    """The positions of the rows that repeat an earlier row, in order."""
    numbered = table.append_column("__row", pa.array(range(table.num_rows), pa.int64()))
    first = numbered.group_by(table.column_names, use_threads=False).aggregate([("__row", "min")])
    is_first = pc.is_in(numbered.column("__row"), value_set=first.column("__row_min"))
    return list(pc.indices_nonzero(pc.invert(is_first)).to_pylist())


def _normalised(table: pa.Table, skip: set[str], decimals: int) -> pa.Table:
    """The table as near-duplicates compare it: strings lower-cased and whitespace-collapsed,
    floats rounded, the ``skip`` columns left out."""
    columns: dict[str, Any] = {}
    for name in table.column_names:
        if name in skip:
            continue
        column = table.column(name)
        kind = _value_type(column.type)
        if kind != column.type:
            column = column.cast(kind)
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            column = pc.utf8_trim_whitespace(pc.utf8_lower(column))
            column = pc.replace_substring_regex(column, pattern=r"\s+", replacement=" ")
        elif pa.types.is_floating(kind):
            column = pc.round(column, ndigits=decimals)
        columns[name] = column
    return pa.table(columns) if columns else pa.table({})


def _distinct_columns(table: pa.Table, profile: TableProfile | None) -> set[str]:
    """Integer and string columns whose values are all distinct: they identify rows. A string
    column's distinct count is taken from ``profile`` (``table``'s) where given."""
    if table.num_rows < 2:
        return set()
    known = {c.name: c.distinct for c in profile.columns} if profile is not None else {}
    found = set()
    for name in table.column_names:
        column = table.column(name)
        kind = _value_type(column.type)
        if column.null_count or not (pa.types.is_integer(kind) or pa.types.is_string(kind)):
            continue
        distinct = known.get(name)
        if distinct is None:
            distinct = pc.count_distinct(column).as_py()
        if distinct == table.num_rows:
            found.add(name)
    return found


def _out_of_range(
    new: pa.Table,
    parent: _Parent,
    path: str,
    skip: set[str],
    spec: OutOfRangeSignal,
    severity: Severity,
) -> CheckResult:
    check = f"signal.out_of_range:{path}"
    old = parent.profile()
    if old is not None and old.rows < spec.min_rows:
        return _ok(
            check,
            severity,
            f"not computed: the parent has {old.rows} rows, fewer than the {spec.min_rows} "
            "that bound a range",
        )
    before = {c.name: c for c in old.columns} if old is not None else {}
    outside: pa.Array | None = None
    ranges: dict[str, str] = {}
    for name in new.column_names:
        prof = before.get(name)
        kind = _value_type(new.schema.field(name).type)
        numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
        if name in skip or prof is None or prof.min is None or prof.max is None or not numeric:
            continue
        pad = spec.margin * (prof.max - prof.min)
        lo, hi = prof.min - pad, prof.max + pad
        values = new.column(name).cast(pa.float64())
        mask = pc.fill_null(pc.or_(pc.less(values, lo), pc.greater(values, hi)), False)
        outside = mask if outside is None else pc.or_(outside, mask)
        ranges[name] = f"[{lo:.4g}, {hi:.4g}]"
    if outside is None:
        return _ok(check, severity, "not computed: no numeric column to compare in both versions")
    positions = pc.indices_nonzero(outside).to_pylist()
    share = len(positions) / max(new.num_rows, 1)
    message = f"{len(positions)} of {new.num_rows} rows ({share:.2%}) outside the parent's range"
    # a fresh value exceeds the largest of n earlier ones with chance 1/(n+1), at each end and
    # in each column: a small parent's range is a loose bound, so expect that many outside
    expected = 2 * len(ranges) / (old.rows + 1) if old is not None else 0.0
    if share > max(spec.max_fraction, expected):
        rows = _rows(new, positions[:REPORT_ROWS])
        spans = ", ".join(f"{k} {v}" for k, v in list(ranges.items())[:6])
        return _failed(
            check,
            severity,
            f"{message} ({spans})" + _shown(rows),
            count=len(positions),
            rows=rows,
        )
    return _ok(check, severity, message)


# --- helpers ------------------------------------------------------------------------------------

_TYPE_TESTS = {
    "int": pa.types.is_integer,
    "float": pa.types.is_floating,
    "number": lambda t: pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t),
    "str": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "bool": pa.types.is_boolean,
    "date": pa.types.is_date,
    "timestamp": pa.types.is_timestamp,
}


def _value_type(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _to_pandas(table: pa.Table) -> Any:
    """The table for pandera: dictionary columns decoded (a categorical would not compare with
    the allowed values as their type), row labels 0..n-1 (the failing rows' positions)."""
    columns = {
        name: table.column(name).cast(_value_type(table.column(name).type))
        for name in table.column_names
    }
    return pa.table(columns).to_pandas()


def _in_bounds(series: Any, bounds: Bounds) -> Any:
    ok = series == series  # NaN is out of every range
    if bounds.min is not None:
        ok &= series >= bounds.min
    if bounds.max is not None:
        ok &= series <= bounds.max
    return ok


def _rows(
    table: pa.Table, positions: Sequence[int], *, focus: str | None = None
) -> list[dict[str, Any]]:
    """``{"row": i, "values": {...}}`` for each position: the focus column first, then up to
    :data:`_REPORT_COLUMNS` columns, values made JSON-safe."""
    if not positions:
        return []
    names = table.column_names
    if focus in names:
        names = [focus, *(n for n in names if n != focus)]
    names = names[:_REPORT_COLUMNS]
    picked = table.select(names).take(pa.array(positions, pa.int64())).to_pylist()
    return [
        {"row": int(p), "values": {k: _plain(v) for k, v in row.items()}}
        for p, row in zip(positions, picked, strict=True)
    ]


def _shown(rows: list[dict[str, Any]], focus: str | None = None) -> str:
    if not rows:
        return ""
    parts = []
    for row in rows:
        values = row["values"]
        if focus is not None and focus in values:
            parts.append(f"row {row['row']} ({focus}={_brief(values[focus])})")
        else:
            inner = ", ".join(f"{k}={_brief(v)}" for k, v in list(values.items())[:4])
            parts.append(f"row {row['row']} ({inner})")
    return ": " + "; ".join(parts)


def _brief(value: Any) -> str:
    """A value as a message shows it (the report's ``rows`` keep it whole)."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return _short(repr(value), 40)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SPECS: dict[str, pathspec.GitIgnoreSpec] = {}


def _spec(glob: str) -> pathspec.GitIgnoreSpec:
    found = _SPECS.get(glob)
    if found is None:
        found = _SPECS[glob] = pathspec.GitIgnoreSpec.from_lines([glob])
    return found


def _suite_error(message: str, *, source: str, line: int | None) -> InvalidInputError:
    return InvalidInputError(
        f"validation suite {message}; fix it and commit again (nothing was committed)",
        field="checks",
        file=source,
        line=line,
    )


def _refuse_duplicate_keys(node: yaml.Node, *, source: str) -> None:
    """YAML keeps the last of two equal keys silently; in a suite that hides a check, so refuse."""
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                line = key.start_mark.line + 1
                raise _suite_error(
                    f"{source}, line {line}: {key.value!r} is given twice in this mapping",
                    source=source,
                    line=line,
                )
            seen.add(key.value)
            _refuse_duplicate_keys(value, source=source)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, source=source)


def _validate(data: dict[str, Any], *, source: str, node: yaml.Node | None) -> Suite:
    try:
        return Suite.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first_line = _line(node, errors[0]["loc"]) if node is not None else None
        shown = []
        for error in errors[:_MAX_SHOWN_ERRORS]:
            where = f"line {_line(node, error['loc'])}: " if node is not None else ""
            shown.append(f"{where}{_loc(error['loc'])}: {_reason(error)}")
        more = f" (and {len(errors) - _MAX_SHOWN_ERRORS} more)" if len(errors) > 5 else ""
        message = f"{source}, " + "; ".join(shown) + more
        raise _suite_error(message, source=source, line=first_line) from None


def _reason(error: Any) -> str:
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return "unknown setting (check its spelling against the suite's documented keys)"
    if "input" in error and error["type"] != "missing":
        return f"{message} (got {_short(repr(error['input']), 60)})"
    return message


def _loc(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _line(node: yaml.Node | None, loc: Sequence[Any]) -> int:
    """The line of the deepest YAML node on the path ``loc`` (pydantic's error location)."""
    if node is None:
        return 1
    line = int(node.start_mark.line) + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((pair for pair in node.value if pair[0].value == str(part)), None)
            if found is None:
                break
            line = int(found[0].start_mark.line) + 1  # the key's line: where the setting is named
            node = found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = int(node.start_mark.line) + 1
        else:
            break
    return line
