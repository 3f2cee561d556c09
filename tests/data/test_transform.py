"""``data transform``: a user function over a real committed dataset version, in real spawned
worker processes, committed as a new version with lineage, cached by input, code and params."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from shipyard.context import Context
from shipyard.data import datasets, lineage, transform
from shipyard.errors import InvalidInputError, NotFoundError
from shipyard.store.tables import AuditEventRow

P = "default"
EX = "tests.data.transforms_example"


def _commit(ctx: Context, root: Path, name: str = "raw") -> str:
    (root / "sub").mkdir(parents=True)
    table = pa.table({"id": list(range(10)), "x": [i * 1.5 for i in range(10)]})
    pq.write_table(table, root / "t.parquet")
    pa_csv.write_csv(pa.table({"id": [1, 2, 3], "x": [2, 4, 6]}), root / "sub" / "c.csv")
    (root / "README.txt").write_text("hello rows\n")
    dv = datasets.commit_directory(ctx, project=P, name=name, source=root)
    return f"{name}@{dv.version}"


def _read(ctx: Context, name: str, version: int, path: str) -> pa.Table:
    return datasets.read_table(ctx, project=P, name=name, version=version, path=path)


def test_rows_transform_writes_a_new_version_with_lineage(ctx: Context, tmp_path: Path) -> None:
    source = _commit(ctx, tmp_path / "src")
    seen: list[tuple[int, int, str]] = []
    out = transform.transform(
        ctx,
        project=P,
        source=source,
        fn=f"{EX}:scale",
        to="scaled",
        params={"column": "x", "factor": 2},
        mode="rows",
        workers=2,
        batch_rows=3,
        progress=lambda done, total, path: seen.append((done, total, path)),
    )
    assert (out.dataset, out.version) == ("scaled", 1)
    files = {f.path: f for f in datasets.list_files(ctx, project=P, name="scaled", version=1)}
    assert sorted(files) == ["README.txt", "sub/c.parquet", "t.parquet"]
    table = _read(ctx, "scaled", 1, "t.parquet")
    assert table.column("id").to_pylist() == list(range(10))  # batch order kept across workers
    assert table.column("x_scaled").to_pylist() == [i * 3.0 for i in range(10)]
    assert _read(ctx, "scaled", 1, "sub/c.parquet").column("x_scaled").to_pylist() == [4, 8, 12]
    raw = {f.path: f for f in datasets.list_files(ctx, project=P, name="raw", version=1)}
    assert files["README.txt"].digest == raw["README.txt"].digest  # kept as it is
    assert seen[-1][0] == seen[-1][1] and len(seen) == 3

    src = datasets.get_version(ctx, project=P, name="raw", version=1)
    edges = lineage.lineage(ctx, kind="dataset_version", id=out.id, project=P)
    assert [(e.source_id, e.relation, e.target_id) for e in edges] == [
        (src.id, "transform", out.id)
    ]
    key = transform.cache_key_of(out)
    assert key is not None and f"{EX}:scale" in out.message
    with ctx.db.read() as s:
        event = s.scalars(
            select(AuditEventRow).where(AuditEventRow.action == "dataset.transform")
        ).one()
    assert event.details["cache_key"] == key
    assert event.details["params"] == {"column": "x", "factor": 2}
    code = transform.resolve_function(f"{EX}:scale").code_digest
    assert event.details["code_digest"] == code


def test_same_input_code_and_params_return_the_cached_version(ctx: Context, tmp_path: Path) -> None:
    source = _commit(ctx, tmp_path / "src")
    marks = tmp_path / "marks"
    marks.mkdir()

    def run(**params: object) -> object:
        return transform.transform(
            ctx,
            project=P,
            source=source,
            fn=f"{EX}:counted",
            to="copy",
            params={"marks": str(marks), **params},
            batch_rows=4,
        )

    first = run()
    calls = len(list(marks.iterdir()))
    assert calls == 3 + 1  # t.parquet: 10 rows in 4-row batches; sub/c.csv: one batch
    again = run()
    assert again == first  # not run again
    assert len(list(marks.iterdir())) == calls
    # other parameters: a new run (same output files, so the commit returns the same version)
    same = run(extra=1)
    assert len(list(marks.iterdir())) == 2 * calls and same.version == first.version
    # ... which is cached too, though no version was written for it
    assert run(extra=1) == same
    assert len(list(marks.iterdir())) == 2 * calls
    # a deleted output is no cache hit: the run happens again and writes a new version
    datasets.delete_version(ctx, project=P, name="copy", version=first.version)
    fresh = run()
    assert len(list(marks.iterdir())) == 3 * calls and fresh.version == first.version + 1


def test_a_change_of_code_runs_again(ctx: Context, tmp_path: Path) -> None:
    source = _commit(ctx, tmp_path / "src")
    code = tmp_path / "code"
    code.mkdir()
    module = code / "tf_code_change.py"
    body = (
        "import pyarrow as pa\n"
        "def add(batch, **_):\n"
        "    return batch.append_column('k', pa.array([{k}] * batch.num_rows))\n"
    )
    module.write_text(body.format(k=1))
    first = transform.transform(
        ctx, project=P, source=source, fn="tf_code_change:add", to="k", search_path=[code]
    )
    assert set(_read(ctx, "k", first.version, "t.parquet").column("k").to_pylist()) == {1}
    module.write_text(body.format(k=22))  # another size: no stale .pyc
    second = transform.transform(
        ctx, project=P, source=source, fn="tf_code_change:add", to="k", search_path=[code]
    )
    assert second.version == first.version + 1
    assert set(_read(ctx, "k", second.version, "t.parquet").column("k").to_pylist()) == {22}
    assert transform.cache_key_of(first) != transform.cache_key_of(second)


def test_rows_may_drop_batches_and_tables(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    pq.write_table(pa.table({"id": list(range(8))}), root / "a.parquet")
    pq.write_table(pa.table({"id": [1, 3, 5]}), root / "odd.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.int64())}), root / "empty.parquet")
    dv = datasets.commit_directory(ctx, project=P, name="nums", source=root)
    out = transform.transform(
        ctx,
        project=P,
        source=f"nums@{dv.version}",
        fn=f"{EX}:keep_even",
        to="even",
        params={"column": "id"},
        batch_rows=2,
    )
    paths = [f.path for f in datasets.list_files(ctx, project=P, name="even", version=out.version)]
    assert paths == ["a.parquet"]  # odd.parquet and the empty table lost every row
    assert _read(ctx, "even", out.version, "a.parquet").column("id").to_pylist() == [0, 2, 4, 6]


def test_files_mode(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("alpha")
    (root / "b.skip").write_text("beta")
    (root / "t.csv").write_text("id\n1\n")
    dv = datasets.commit_directory(ctx, project=P, name="docs", source=root)
    out = transform.transform(
        ctx,
        project=P,
        source=f"docs@v{dv.version}",
        fn=f"{EX}:shout",
        to="loud",
        params={"drop": ".skip"},
        mode="files",
    )
    files = datasets.list_files(ctx, project=P, name="loud", version=out.version)
    assert [f.path for f in files] == ["a.txt", "t.csv"]
    assert ctx.blobs.get_bytes(files[0].digest) == b"ALPHA"
    assert ctx.blobs.get_bytes(files[1].digest) == b"ID\n1\n"


def test_auto_mode_without_tables_uses_files(ctx: Context, tmp_path: Path) -> None:
    root = tmp_path / "docs"
    root.mkdir()
    (root / "a.txt").write_text("alpha")
    datasets.commit_directory(ctx, project=P, name="docs", source=root)
    out = transform.transform(ctx, project=P, source="docs", fn=f"{EX}:shout", to="loud")
    files = datasets.list_files(ctx, project=P, name="loud", version=out.version)
    assert ctx.blobs.get_bytes(files[0].digest) == b"ALPHA"
    with pytest.raises(InvalidInputError, match="no table files"):
        transform.transform(ctx, project=P, source="docs", fn=f"{EX}:scale", to="x", mode="rows")


# --- faults -------------------------------------------------------------------------------------


def _nothing_written(ctx: Context, name: str) -> None:
    with pytest.raises(NotFoundError):
        datasets.get_dataset(ctx, project=P, name=name)


def test_a_batch_that_raises_writes_nothing_and_names_the_batch(
    ctx: Context, tmp_path: Path
) -> None:
    source = _commit(ctx, tmp_path / "src")
    with pytest.raises(InvalidInputError) as info:
        transform.transform(
            ctx,
            project=P,
            source=source,
            fn=f"{EX}:fail_on",
            to="broken",
            params={"column": "id", "value": 7},
            batch_rows=3,
            workers=2,
        )
    message = info.value.message
    assert "table 't.parquet' batch 2" in message  # rows 6..8
    assert "ValueError: bad value 7 in id" in message
    assert "nothing was committed" in message
    assert "fail_on" in info.value.details["traceback"]
    _nothing_written(ctx, "broken")


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (f"{EX}:wrong_type", "returned list"),
        (f"{EX}:die", "worker process died"),
    ],
)
def test_bad_results_and_dead_workers_write_nothing(
    ctx: Context, tmp_path: Path, fn: str, expected: str
) -> None:
    source = _commit(ctx, tmp_path / "src")
    with pytest.raises(InvalidInputError, match=expected) as info:
        transform.transform(ctx, project=P, source=source, fn=fn, to="broken")
    assert "batch 0" in info.value.message
    _nothing_written(ctx, "broken")


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        ("no_such_module_xyz:fn", "module 'no_such_module_xyz' cannot be imported"),
        (f"{EX}:no_such_function", f"module '{EX}' has no 'no_such_function'"),
        (f"{EX}:NOT_CALLABLE", "is not a function"),
        ("just_a_name", "is not of the form pkg.module:function"),
        ("math:sqrt", "has no Python source file"),  # a built-in module: no code to digest
    ],
)
def test_an_fn_that_does_not_resolve_is_named(
    ctx: Context, tmp_path: Path, fn: str, expected: str
) -> None:
    source = _commit(ctx, tmp_path / "src")
    with pytest.raises(InvalidInputError, match=expected) as info:
        transform.transform(ctx, project=P, source=source, fn=fn, to="out")
    assert fn in info.value.message and info.value.field == "fn"
    _nothing_written(ctx, "out")


def test_a_module_that_fails_to_import_is_named(ctx: Context, tmp_path: Path) -> None:
    source = _commit(ctx, tmp_path / "src")
    (tmp_path / "tf_broken_import.py").write_text("raise RuntimeError('boom at import')\n")
    with pytest.raises(InvalidInputError, match="RuntimeError: boom at import"):
        transform.transform(
            ctx,
            project=P,
            source=source,
            fn="tf_broken_import:f",
            to="out",
            search_path=[tmp_path],
        )


def test_a_missing_version_or_dataset_is_not_found(ctx: Context, tmp_path: Path) -> None:
    _commit(ctx, tmp_path / "src")
    with pytest.raises(NotFoundError, match="no version 9"):
        transform.transform(ctx, project=P, source="raw@9", fn=f"{EX}:scale", to="out")
    with pytest.raises(NotFoundError, match="does not exist"):
        transform.transform(ctx, project=P, source="nope@1", fn=f"{EX}:scale", to="out")
    _nothing_written(ctx, "out")


def test_two_tables_claiming_one_output_path_are_refused_before_running(
    ctx: Context, tmp_path: Path
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    pq.write_table(pa.table({"id": [1]}), root / "t.parquet")
    (root / "t.csv").write_text("id\n2\n")
    datasets.commit_directory(ctx, project=P, name="twins", source=root)
    marks = tmp_path / "marks"
    marks.mkdir()
    with pytest.raises(InvalidInputError, match=r"would both be written to 't\.parquet'"):
        transform.transform(
            ctx,
            project=P,
            source="twins",
            fn=f"{EX}:counted",
            to="out",
            params={"marks": str(marks)},
        )
    assert not list(marks.iterdir())  # refused before any batch ran
    _nothing_written(ctx, "out")


def test_params_must_be_json(ctx: Context, tmp_path: Path) -> None:
    source = _commit(ctx, tmp_path / "src")
    with pytest.raises(InvalidInputError, match="params must be plain JSON"):
        transform.transform(
            ctx, project=P, source=source, fn=f"{EX}:scale", to="out", params={"f": object()}
        )
    _nothing_written(ctx, "out")


def test_a_module_in_a_folder_is_imported_by_the_workers(ctx: Context, tmp_path: Path) -> None:
    source = _commit(ctx, tmp_path / "src")
    (tmp_path / "tf_in_folder.py").write_text(
        textwrap.dedent(
            """
            def ident(batch):
                return batch
            """
        )
    )
    out = transform.transform(
        ctx,
        project=P,
        source=source,
        fn="tf_in_folder:ident",
        to="same",
        search_path=[tmp_path],
    )
    assert _read(ctx, "same", out.version, "t.parquet").column("id").to_pylist() == list(range(10))
