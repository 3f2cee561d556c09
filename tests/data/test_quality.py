"""Validation suites at commit: real folders with a ``shipyard-checks.yaml``, real commits on a
real home. Every check kind passes on clean data and fails on data broken for it; an ``error``
refuses the commit with the failing rows and leaves the store as it was, a ``warning`` is recorded
on the version; a suite that does not parse is refused naming its file and line."""

from __future__ import annotations

import inspect
import io
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shipyard.client import Client, HttpBackend
from shipyard.client.client import DatasetsClient
from shipyard.context import Context
from shipyard.data import datasets, quality
from shipyard.domain.models import DatasetVersion
from shipyard.errors import InvalidInputError
from shipyard.settings import Settings
from tests.conftest import LiveServer
from tests.data.conftest import BOTH_DATABASES

P = "default"
N = 200
SPECIES = ["cat", "dog", "bird"]

SUITE = r"""
tables:
  - files: "people.csv"
    severity: {severity}
    rows: {{min: 100, max: 1000}}
    strict: true
    label: species
    unique: [id, email]
    columns:
      id: {{type: int, nullable: false, unique: true}}
      age: {{type: number, min: 0, max: 120, max_null_rate: 0.1}}
      species: {{type: str, allowed: [cat, dog, bird]}}
      email: {{type: str, pattern: 'user[0-9]+@example\.org'}}
      score: {{type: float}}
"""

CHECKS = [
    "quality.schema:people.csv",
    "quality.rows:people.csv",
    *(f"quality.type:people.csv:{c}" for c in ("id", "age", "species", "email", "score")),
    "quality.nulls:people.csv:id",
    "quality.unique:people.csv:id",
    "quality.range:people.csv:age",
    "quality.null_rate:people.csv:age",
    "quality.allowed:people.csv:species",
    "quality.pattern:people.csv:email",
    "quality.unique:people.csv:id+email",
]

Rows = dict[str, list[Any]]


def people(n: int = N, seed: int = 3) -> Rows:
    rng = np.random.default_rng(seed)
    age = rng.uniform(18, 90, n).round(1).tolist()
    for i in rng.choice(n, size=n // 50, replace=False):
        age[i] = None
    return {
        "id": list(range(n)),
        "age": age,
        "species": [SPECIES[i] for i in rng.integers(0, 3, n)],
        "email": [f"user{i}@example.org" for i in range(n)],
        "score": rng.normal(0.5, 0.1, n).round(4).tolist(),
    }


def write_csv(path: Path, rows: Rows) -> None:
    lines = [",".join(rows)]
    for values in zip(*rows.values(), strict=True):
        lines.append(",".join("" if v is None else str(v) for v in values))
    path.write_text("\n".join(lines) + "\n")


def folder(root: Path, rows: Rows, suite: str | None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_csv(root / "people.csv", rows)
    if suite is not None:
        (root / quality.SUITE_FILE).write_text(textwrap.dedent(suite))
    return root


def commit(ctx: Context, source: Path, name: str = "people") -> DatasetVersion:
    return datasets.commit_directory(ctx, project=P, name=name, source=source)


def results(version: DatasetVersion) -> dict[str, Any]:
    return {v.check: v for v in version.validation}


def refused(ctx: Context, source: Path, name: str = "people") -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        commit(ctx, source, name)
    return caught.value


def failures(error: InvalidInputError) -> dict[str, dict[str, Any]]:
    assert error.field == "files"
    return {f["check"]: f for f in error.details["failures"]}


def assert_unchanged(ctx: Context, before: list[DatasetVersion], name: str = "people") -> None:
    """No version was added, and every older one still reads back whole."""
    after = datasets.list_versions(ctx, project=P, name=name)
    assert after == before
    for version in after:
        for entry in datasets.list_files(ctx, project=P, name=name, version=version.version):
            assert len(ctx.blobs.get_bytes(entry.digest)) == entry.size


# --- every check kind -----------------------------------------------------------------------------


@BOTH_DATABASES
def test_clean_data_passes_every_check_and_the_results_are_recorded(
    ctx: Context, tmp_path: Path
) -> None:
    source = folder(tmp_path / "people", people(), SUITE.format(severity="error"))

    version = commit(ctx, source)

    found = results(version)
    for check in CHECKS:
        assert found[check].passed, (check, found[check].message)
    assert "all 200 rows within [0, 120]" in found["quality.range:people.csv:age"].message
    # the suite is a file of the version: a checkout brings back what the data was checked with
    paths = [f.path for f in datasets.list_files(ctx, project=P, name="people")]
    assert paths == ["people.csv", quality.SUITE_FILE]
    assert datasets.get_version(ctx, project=P, name="people") == version


def _set(column: str, rows: dict[int, Any]) -> Callable[[Rows], None]:
    def change(data: Rows) -> None:
        for i, value in rows.items():
            data[column][i] = value

    return change


def _null_ages(data: Rows) -> None:
    for i in range(0, N, 3):
        data["age"][i] = None


def _few_rows(data: Rows) -> None:
    for column in data.values():
        del column[50:]


def _drop_email(data: Rows) -> None:
    del data["email"]


def _add_column(data: Rows) -> None:
    data["extra"] = [1] * N


def _text_scores(data: Rows) -> None:
    data["score"][8] = "high"


# (check that fails, how the data is broken, the rows it must report, a text in the message)
BROKEN = {
    "range": ("quality.range:people.csv:age", _set("age", {5: 150, 17: -3}), [5, 17], "150"),
    "allowed": ("quality.allowed:people.csv:species", _set("species", {3: "lizard"}), [3], "liz"),
    "unique": ("quality.unique:people.csv:id", _set("id", {10: 9}), [9, 10], "id=9"),
    "nulls": ("quality.nulls:people.csv:id", _set("id", {4: None}), [4], "id=None"),
    "null_rate": ("quality.null_rate:people.csv:age", _null_ages, [0, 3, 6, 9, 12], "above"),
    "pattern": ("quality.pattern:people.csv:email", _set("email", {7: "nobody"}), [7], "nobody"),
    "rows": ("quality.rows:people.csv", _few_rows, [], "50 rows, expected [100, 1000]"),
    "type": ("quality.type:people.csv:score", _text_scores, [], "is string"),
    "missing": ("quality.schema:people.csv", _drop_email, [], "missing columns: email"),
    "strict": ("quality.schema:people.csv", _add_column, [], "does not declare"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_an_error_check_refuses_the_commit_with_the_failing_rows(
    ctx: Context, tmp_path: Path, case: str
) -> None:
    check, breaks, rows, text = BROKEN[case]
    source = folder(tmp_path / "people", people(), SUITE.format(severity="error"))
    commit(ctx, source)
    before = datasets.list_versions(ctx, project=P, name="people")

    data = people()
    breaks(data)
    write_csv(source / "people.csv", data)
    error = refused(ctx, source)

    failed = failures(error)
    assert check in failed, sorted(failed)
    assert text in failed[check]["message"], failed[check]["message"]
    assert failed[check]["severity"] == "error"
    assert [r["row"] for r in failed[check]["rows"]] == rows
    for reported in failed[check]["rows"]:  # each reported row carries its values
        assert reported["values"] == {k: data[k][reported["row"]] for k in reported["values"]}
    if rows:
        assert failed[check]["count"] >= len(rows)
    assert error.details["failed_checks"] == len(error.details["failures"])
    assert check in error.message and "nothing was committed" in error.message
    assert_unchanged(ctx, before)

    write_csv(source / "people.csv", people(seed=4))  # fixed data commits as the next version
    assert commit(ctx, source).version == 2


@pytest.mark.parametrize("case", ["range", "unique", "null_rate", "rows", "missing"])
def test_a_warning_check_is_recorded_on_the_version(
    ctx: Context, tmp_path: Path, case: str
) -> None:
    check, breaks, rows, text = BROKEN[case]
    data = people()
    breaks(data)
    source = folder(tmp_path / "people", data, SUITE.format(severity="warning"))

    version = commit(ctx, source)

    found = results(version)
    assert not found[check].passed and text in found[check].message
    for row in rows[: quality.REPORT_ROWS]:
        assert f"row {row} " in found[check].message
    assert datasets.get_version(ctx, project=P, name="people") == version


def test_reported_rows_are_the_first_few_and_the_count_is_all(ctx: Context, tmp_path: Path) -> None:
    data = people()
    for i in range(20, 60):
        data["species"][i] = "lizard"
    source = folder(tmp_path / "people", data, SUITE.format(severity="error"))

    failed = failures(refused(ctx, source))["quality.allowed:people.csv:species"]

    assert failed["count"] == 40
    assert [r["row"] for r in failed["rows"]] == list(range(20, 20 + quality.REPORT_ROWS))
    assert all(r["values"]["species"] == "lizard" for r in failed["rows"])
    assert next(iter(failed["rows"][0]["values"])) == "species"  # the failing column comes first
    assert failed["message"].startswith("40 of 200 rows not in the allowed values (cat, dog, bird)")
    assert datasets.list_datasets(ctx, project=P) == []


def test_errors_and_warnings_mix_by_block(ctx: Context, tmp_path: Path) -> None:
    suite = """
    tables:
      - files: "*.csv"
        columns:
          age: {min: 0, max: 120}
      - files: "*.csv"
        severity: warning
        columns:
          age: {max: 60}
    """
    source = folder(tmp_path / "people", people(), suite)

    version = commit(ctx, source)  # ages up to 90: above the warning's 60, within the error's 120

    checks = [(v.check, v.passed) for v in version.validation if v.check.startswith("quality.")]
    assert checks.count(("quality.range:people.csv:age", True)) == 1
    assert checks.count(("quality.range:people.csv:age", False)) == 1
    warned = [v for v in version.validation if not v.passed and v.check.startswith("quality.")]
    assert len(warned) == 1 and "outside [-inf, 60]" in warned[0].message


def test_a_parquet_table_in_a_subfolder_is_checked_by_glob(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    pq.write_table(
        pa.table({"x": pa.array([1, 2, 3], pa.int32()), "y": ["a", "b", None]}),
        root / "train" / "part-0.parquet",
    )
    (root / quality.SUITE_FILE).write_text(
        "tables:\n  - files: 'train/*.parquet'\n    columns:\n"
        "      x: {type: int, min: 1}\n      y: {nullable: false}\n"
    )

    error = refused(ctx, root, "parts")

    failed = failures(error)
    assert list(failed) == ["quality.nulls:train/part-0.parquet:y"]
    assert failed["quality.nulls:train/part-0.parquet:y"]["rows"] == [
        {"row": 2, "values": {"y": None, "x": 3}}
    ]


def test_a_glob_that_matches_nothing_fails_at_its_severity(ctx: Context, tmp_path: Path) -> None:
    suite = "tables:\n  - files: 'tabels/*.csv'\n    rows: {min: 1}\n"
    source = folder(tmp_path / "people", people(), suite)

    failed = failures(refused(ctx, source))

    assert "matches no file" in failed["quality.matches:tabels/*.csv"]["message"]
    (source / quality.SUITE_FILE).write_text(suite + "    severity: warning\n")
    found = results(commit(ctx, source))
    assert not found["quality.matches:tabels/*.csv"].passed


def test_an_unreadable_table_fails_the_block_that_checks_it(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "broken"
    root.mkdir()
    (root / "t.parquet").write_bytes(b"not parquet at all")
    (root / quality.SUITE_FILE).write_text("tables:\n  - files: '*.parquet'\n")

    failed = failures(refused(ctx, root, "broken"))

    assert "cannot be read" in failed["quality.readable:t.parquet"]["message"]


# --- images -------------------------------------------------------------------------------------


def png(width: int, height: int, *, kind: str = "PNG") -> bytes:
    rng = np.random.default_rng(width * 1000 + height)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=kind)
    return out.getvalue()


IMAGE_SUITE = """
images:
  - files: "images/**/*.png"
    severity: {severity}
    formats: [png]
    width: {{min: 8, max: 256}}
    height: {{min: 8, max: 256}}
    bytes: {{max: 200000}}
"""


def image_folder(root: Path, severity: str) -> Path:
    (root / "images" / "cats").mkdir(parents=True)
    for i in range(4):
        (root / "images" / "cats" / f"ok-{i}.png").write_bytes(png(16 + i, 24))
    (root / quality.SUITE_FILE).write_text(textwrap.dedent(IMAGE_SUITE.format(severity=severity)))
    return root


def break_images(root: Path) -> None:
    whole = png(32, 32)
    (root / "images" / "cats" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "images" / "cats" / "jpeg-inside.png").write_bytes(png(32, 32, kind="JPEG"))
    (root / "images" / "wide.png").write_bytes(png(400, 4))
    (root / "images" / "noise.png").write_bytes(b"\x89PNG but not really")


def test_images_that_decode_within_bounds_pass(ctx: Context, tmp_path: Path) -> None:
    version = commit(ctx, image_folder(tmp_path / "imgs", "error"), "imgs")

    found = results(version)
    for kind in ("decodable", "format", "width", "height", "bytes"):
        check = found[f"quality.image.{kind}:images/**/*.png"]
        assert check.passed and check.message == "all 4 images pass"


def test_broken_or_out_of_bounds_images_refuse_the_commit(ctx: Context, tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs", "error")
    commit(ctx, root, "imgs")
    before = datasets.list_versions(ctx, project=P, name="imgs")
    break_images(root)

    failed = failures(refused(ctx, root, "imgs"))

    def paths(kind: str) -> list[str]:
        return [r["path"] for r in failed[f"quality.image.{kind}:images/**/*.png"]["rows"]]

    assert paths("decodable") == ["images/cats/truncated.png", "images/noise.png"]
    assert paths("format") == ["images/cats/jpeg-inside.png"]
    assert paths("width") == ["images/wide.png"]
    assert paths("height") == ["images/wide.png"]
    assert "quality.image.bytes:images/**/*.png" not in failed
    width = failed["quality.image.width:images/**/*.png"]
    assert (
        width["rows"][0]["values"]["width"] == 400
        and "width 400 outside [8, 256]" in (width["message"])
    )
    assert_unchanged(ctx, before, "imgs")


def test_broken_images_under_a_warning_are_recorded(ctx: Context, tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs", "warning")
    break_images(root)

    found = results(commit(ctx, root, "imgs"))

    decodable = found["quality.image.decodable:images/**/*.png"]
    assert not decodable.passed and decodable.message.startswith("2 of 8 images fail")
    assert "truncated.png: cannot be decoded" in decodable.message
    assert found["quality.image.bytes:images/**/*.png"].passed


# --- a suite that does not parse ----------------------------------------------------------------

BAD_SUITES = {
    "yaml syntax": ("tables:\n  - files: [people.csv\n    rows: 3\n", 3, "expected ',' or ']'"),
    "unknown key": (
        "tables:\n  - files: people.csv\n    colums:\n      id: {unique: true}\n",
        3,
        "tables[0].colums: unknown setting",
    ),
    "wrong type": (
        "tables:\n  - files: people.csv\n    columns:\n      age: {min: zero}\n",
        4,
        "tables[0].columns.age.min: Input should be a valid number",
    ),
    "min above max": (
        "tables:\n  - files: people.csv\n    rows: {min: 10, max: 2}\n",
        3,
        "min 10 is above max 2",
    ),
    "bad severity": (
        "images:\n  - files: '*.png'\n    severity: fatal\n",
        3,
        "images[0].severity: Input should be 'error' or 'warning'",
    ),
    "bad regex": (
        "tables:\n  - files: people.csv\n    columns:\n      email: {pattern: '[a-'}\n",
        4,
        "not a regular expression",
    ),
    "duplicate key": (
        "tables:\n  - files: people.csv\n    rows: {min: 1}\n    rows: {max: 2}\n",
        4,
        "'rows' is given twice",
    ),
    "not a mapping": ("- people.csv\n", 1, "must be a mapping"),
    "empty": ("# nothing yet\n", 1, "the suite is empty"),
    "missing files": ("tables:\n  - rows: {min: 1}\n", 2, "tables[0].files: Field required"),
}


@pytest.mark.parametrize("case", list(BAD_SUITES))
def test_a_suite_that_does_not_parse_names_file_line_and_problem(
    ctx: Context, tmp_path: Path, case: str
) -> None:
    text, line, problem = BAD_SUITES[case]
    source = folder(tmp_path / "people", people(), SUITE.format(severity="error"))
    commit(ctx, source)
    before = datasets.list_versions(ctx, project=P, name="people")
    (source / quality.SUITE_FILE).write_text(text)
    write_csv(source / "people.csv", people(seed=5))

    error = refused(ctx, source)

    assert error.field == "checks"
    assert error.details["file"] == quality.SUITE_FILE and error.details["line"] == line
    assert f"{quality.SUITE_FILE}, line {line}" in error.message
    assert problem in error.message, error.message
    assert "nothing was committed" in error.message
    assert_unchanged(ctx, before)


def test_a_suite_that_is_not_utf8_is_refused(ctx: Context, tmp_path: Path) -> None:
    source = folder(tmp_path / "people", people(), None)
    (source / quality.SUITE_FILE).write_bytes(b"tables: \xff\xfe\n")

    error = refused(ctx, source)

    assert error.field == "checks" and "not UTF-8" in error.message
    assert datasets.list_datasets(ctx, project=P) == []


def test_load_suite_takes_a_mapping_a_file_or_a_suite(tmp_path: Path) -> None:
    mapping = {"tables": [{"files": "*.csv", "columns": {"id": {"unique": True}}}]}
    suite = quality.load_suite(mapping)
    assert suite.tables[0].columns["id"].unique and suite.signals.duplicates is not None
    assert quality.load_suite(suite) is suite
    path = tmp_path / "checks.yaml"
    path.write_text("tables:\n  - files: '*.csv'\n    columns:\n      id: {unique: true}\n")
    assert quality.load_suite(path) == suite
    with pytest.raises(InvalidInputError) as caught:
        quality.load_suite({"tables": [{"files": "*.csv", "rows": {"min": "x"}}]})
    assert caught.value.field == "checks" and "tables[0].rows.min" in caught.value.message
    path.write_text("tables:\n  - files: '*.csv'\n    unique: []\n")
    with pytest.raises(InvalidInputError) as caught:
        quality.load_suite(path)
    assert f"{path}, line 3: tables[0].unique" in caught.value.message
    with pytest.raises(InvalidInputError, match="cannot read the suite file"):
        quality.load_suite(tmp_path / "missing.yaml")


_SDK_CHECKS = "checks" in inspect.signature(DatasetsClient.commit).parameters


@pytest.mark.skipif(not _SDK_CHECKS, reason="client.datasets.commit(checks=) is not wired in yet")
@pytest.mark.parametrize("way", ["embedded", "server"])
def test_a_suite_passed_in_the_sdk_is_run_and_may_not_double_a_suite_file(
    tmp_path: Path, way: str, request: pytest.FixtureRequest
) -> None:
    if way == "server":
        server: LiveServer = request.getfixturevalue("live_server")
        client = Client(settings=Settings(home=tmp_path / "unused", url=server.url))
    else:
        client = Client(settings=Settings(home=tmp_path / "home"))
    data = people()
    data["age"][11] = 500
    source = folder(tmp_path / "people", data, None)
    checks: Any = {"tables": [{"files": "people.csv", "columns": {"age": {"max": 120}}}]}
    sdk: Any = client.datasets

    with pytest.raises(InvalidInputError) as caught:
        sdk.commit(source, name="people", checks=checks)
    rows = failures(caught.value)["quality.range:people.csv:age"]["rows"]
    assert rows == [{"row": 11, "values": {k: data[k][11] for k in data}}]
    with pytest.raises(InvalidInputError) as caught:
        sdk.commit(source, name="people", checks={"tables": [{"files": 3}]})
    assert caught.value.field == "checks" and "tables[0].files" in caught.value.message

    (source / quality.SUITE_FILE).write_text("tables:\n  - files: people.csv\n")
    with pytest.raises(InvalidInputError, match="give the suite one way"):
        sdk.commit(source, name="people", checks=checks)
    assert client.datasets.list() == []
    (source / quality.SUITE_FILE).unlink()
    data["age"][11] = 50
    write_csv(source / "people.csv", data)
    version = sdk.commit(source, name="people", checks=quality.load_suite(checks))
    assert [v.check for v in version.validation if v.check.startswith("quality.")] == [
        "quality.schema:people.csv",
        "quality.range:people.csv:age",
    ]


# --- through a server: the same suite, the same refusal -----------------------------------------


def test_a_commit_through_the_server_runs_the_suite_it_carries(
    tmp_path: Path, live_server: LiveServer
) -> None:
    client = Client(settings=Settings(home=tmp_path / "unused", url=live_server.url))
    assert isinstance(client.backend, HttpBackend)
    source = folder(tmp_path / "people", people(), SUITE.format(severity="error"))
    v1 = client.datasets.commit(source, name="people")
    assert all(v.passed for v in v1.validation if v.check.startswith("quality."))
    data = people()
    data["species"][12] = "lizard"
    write_csv(source / "people.csv", data)

    with pytest.raises(InvalidInputError) as caught:
        client.datasets.commit(source, name="people")

    failed = failures(caught.value)["quality.allowed:people.csv:species"]
    assert failed["rows"][0]["row"] == 12 and failed["rows"][0]["values"]["species"] == "lizard"
    assert [v.version for v in client.datasets.versions("people")] == [1]
    (source / quality.SUITE_FILE).write_text("tables:\n  - files: people.csv\n    rows: {min: x}\n")
    with pytest.raises(InvalidInputError, match=r"shipyard-checks.yaml, line 3: tables\[0\]"):
        client.datasets.commit(source, name="people")
    assert [v.version for v in client.datasets.versions("people")] == [1]
