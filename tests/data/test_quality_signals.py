"""Poisoning signals: each version of a table is compared with the table at the same path in its
parent version. A fresh sample of the same data raises none; a shifted label distribution, a jump
in exact or near-duplicate rows, and rows outside the parent's ranges each raise theirs, recorded
on the version as a failed (warning) result - or refusing the commit when the suite says so."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shipyard.context import Context
from shipyard.data import datasets, quality
from shipyard.domain.models import DatasetVersion, ValidationResult
from shipyard.errors import InvalidInputError
from tests.data.conftest import BOTH_DATABASES

P = "default"
N = 600
LABELS = np.array(["cat", "dog", "bird"])
PATH = "train.parquet"
SIGNALS = ("label_shift", "duplicates", "out_of_range")
LABEL = "tables:\n  - files: '*.parquet'\n    label: label\n"


def sample(seed: int, n: int = N, weights: tuple[float, ...] = (0.4, 0.35, 0.25)) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table(
        {
            "x1": rng.normal(0, 1, n),
            "x2": rng.normal(10, 2, n),
            "colour": rng.choice(["red", "green", "blue"], n),
            "label": LABELS[rng.choice(3, n, p=weights)],
        }
    )


def commit(ctx: Context, root: Path, table: pa.Table, suite: str | None = LABEL) -> DatasetVersion:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / PATH)
    if suite is not None:
        (root / quality.SUITE_FILE).write_text(suite)
    return datasets.commit_directory(ctx, project=P, name="train", source=root)


def signals(version: DatasetVersion) -> dict[str, ValidationResult]:
    found = {v.check: v for v in version.validation if v.check.startswith("signal.")}
    return {check.removeprefix("signal.").removesuffix(f":{PATH}"): v for check, v in found.items()}


def flagged(version: DatasetVersion) -> list[str]:
    return sorted(kind for kind, v in signals(version).items() if not v.passed)


@BOTH_DATABASES
def test_a_fresh_sample_of_the_same_data_raises_no_signal(ctx: Context, tmp_path: Path) -> None:
    v1 = commit(ctx, tmp_path / "d", sample(1))
    v2 = commit(ctx, tmp_path / "d", sample(2))

    assert signals(v1) == {}  # no parent, nothing to compare with
    found = signals(v2)
    assert sorted(found) == sorted(SIGNALS)
    assert flagged(v2) == [], {k: v.message for k, v in found.items()}
    assert "chi-square p=" in found["label_shift"].message
    assert found["duplicates"].message == "duplicate rows 0.0% (0), near-duplicates 0.0% (0)"
    assert datasets.get_version(ctx, project=P, name="train") == v2


def test_a_shifted_label_distribution_is_flagged(ctx: Context, tmp_path: Path) -> None:
    commit(ctx, tmp_path / "d", sample(1))

    v2 = commit(ctx, tmp_path / "d", sample(2, weights=(0.8, 0.1, 0.1)))

    assert flagged(v2) == ["label_shift"]
    message = signals(v2)["label_shift"].message
    assert message.startswith("distribution shifted: label 'label' vs parent: chi-square p=")
    assert "shift 42.2% (bird 22% -> 8%, cat 41% -> 83%, dog 37% -> 10%)" in message


def test_a_small_but_significant_shift_is_not_flagged_below_min_shift(
    ctx: Context, tmp_path: Path
) -> None:
    suite = LABEL + "signals:\n  label_shift: {min_shift: 0.5}\n"
    commit(ctx, tmp_path / "d", sample(1), suite)

    v2 = commit(ctx, tmp_path / "d", sample(2, weights=(0.8, 0.1, 0.1)), suite)

    assert flagged(v2) == []
    assert "chi-square" in signals(v2)["label_shift"].message


def test_a_jump_in_exact_duplicates_is_flagged_with_the_repeated_rows(
    ctx: Context, tmp_path: Path
) -> None:
    clean = sample(1)
    commit(ctx, tmp_path / "d", clean)
    copies = clean.take(pa.array(np.arange(0, 300, 2)))  # 150 rows seen before
    poisoned = pa.concat_tables([clean, copies])

    v2 = commit(ctx, tmp_path / "d", poisoned)

    assert "duplicates" in flagged(v2)
    message = signals(v2)["duplicates"].message
    # compared at the parent's 600 rows: a sample of 600 of the 750 keeps 16.5% repeats
    assert message.startswith("jump in duplicate rows 0.0% -> 16.5% (150 in all)")
    assert "vs parent, at 600 rows each" in message
    assert f"row {N} (x1=" in message  # the first repeat is the first appended row


def test_near_duplicates_with_flipped_labels_are_flagged(ctx: Context, tmp_path: Path) -> None:
    clean = sample(1)
    commit(ctx, tmp_path / "d", clean)
    picked = clean.slice(0, 120)
    flipped = pa.table(
        {
            "x1": pa.compute.add(picked["x1"], 1e-7),  # not equal, but equal once rounded
            "x2": picked["x2"],
            "colour": pa.compute.utf8_upper(picked["colour"]),
            "label": pa.array(np.roll(picked["label"].to_numpy(zero_copy_only=False), 1)),
        }
    )
    v2 = commit(ctx, tmp_path / "d", pa.concat_tables([clean, flipped]))

    found = signals(v2)
    assert not found["duplicates"].passed
    assert "duplicate rows 0.0% -> 0.0% (0 in all)" in found["duplicates"].message
    assert "near-duplicates 0.0% -> 13.5% (120 in all)" in found["duplicates"].message
    assert "row 600 (x1=" in found["duplicates"].message  # the first flipped copy


def test_rows_outside_the_parents_ranges_are_flagged(ctx: Context, tmp_path: Path) -> None:
    commit(ctx, tmp_path / "d", sample(1))
    shifted = sample(2)
    x1 = shifted["x1"].to_numpy().copy()
    x1[[3, 50, 99, 120, 400, 401, 590]] = 1000.0
    shifted = shifted.set_column(0, "x1", pa.array(x1))

    v2 = commit(ctx, tmp_path / "d", shifted)

    assert flagged(v2) == ["out_of_range"]
    message = signals(v2)["out_of_range"].message
    assert message.startswith("7 of 600 rows (1.17%) outside the parent's range (x1 [")
    assert "row 3 (x1=1000, " in message and "row 120 (x1=1000, " in message


def test_signals_run_without_a_suite_except_the_label_shift(ctx: Context, tmp_path: Path) -> None:
    clean = sample(1)
    commit(ctx, tmp_path / "d", clean, suite=None)

    v2 = commit(ctx, tmp_path / "d", pa.concat_tables([clean, clean]), suite=None)

    assert sorted(signals(v2)) == ["duplicates", "out_of_range"]
    assert flagged(v2) == ["duplicates"]


def test_signals_of_severity_error_refuse_the_commit(ctx: Context, tmp_path: Path) -> None:
    suite = LABEL + "signals:\n  severity: error\n  out_of_range: false\n"
    clean = sample(1)
    v1 = commit(ctx, tmp_path / "d", clean, suite)

    with pytest.raises(InvalidInputError) as caught:
        commit(ctx, tmp_path / "d", pa.concat_tables([clean, clean.slice(0, 200)]), suite)

    failures = {f["check"]: f for f in caught.value.details["failures"]}
    assert list(failures) == [f"signal.duplicates:{PATH}"]
    assert failures[f"signal.duplicates:{PATH}"]["count"] == 200
    assert [r["row"] for r in failures[f"signal.duplicates:{PATH}"]["rows"]] == list(
        range(N, N + quality.REPORT_ROWS)
    )
    assert datasets.list_versions(ctx, project=P, name="train") == [v1]
    assert pq.read_table(
        pa.BufferReader(
            ctx.blobs.get_bytes(datasets.list_files(ctx, project=P, name="train")[1].digest)
        )
    ).equals(clean)


def test_signals_can_be_turned_off(ctx: Context, tmp_path: Path) -> None:
    suite = LABEL + "signals:\n  duplicates: false\n  label_shift: false\n  out_of_range: true\n"
    clean = sample(1)
    commit(ctx, tmp_path / "d", clean, suite)

    v2 = commit(ctx, tmp_path / "d", pa.concat_tables([clean, clean]), suite)

    assert sorted(signals(v2)) == ["out_of_range"]


def test_an_unchanged_table_is_not_compared_again(ctx: Context, tmp_path: Path) -> None:
    commit(ctx, tmp_path / "d", sample(1))
    (tmp_path / "d" / "notes.txt").write_text("only the notes changed")

    v2 = datasets.commit_directory(ctx, project=P, name="train", source=tmp_path / "d")

    assert v2.version == 2 and signals(v2) == {}


def test_signals_compare_tables_directly() -> None:
    old = sample(1)
    shifted = sample(2, weights=(0.1, 0.1, 0.8))
    new = pa.concat_tables([shifted, shifted.slice(0, 300)])

    results: dict[str, Any] = {
        r.check: r for r in quality.signals(new, old, path="t.parquet", label="label")
    }

    assert not results["signal.label_shift:t.parquet"].passed
    assert not results["signal.duplicates:t.parquet"].passed
    assert results["signal.duplicates:t.parquet"].count == 300
    assert results["signal.out_of_range:t.parquet"].passed
    assert all(r.severity is quality.Severity.WARNING for r in results.values())


def with_ids(table: pa.Table, start: int = 0) -> pa.Table:
    return table.add_column(0, "id", pa.array(np.arange(start, start + table.num_rows)))


def test_a_growing_id_is_not_out_of_range_and_fresh_ids_do_not_hide_copies(
    ctx: Context, tmp_path: Path
) -> None:
    clean = sample(1)
    commit(ctx, tmp_path / "d", with_ids(clean))

    appended = with_ids(pa.concat_tables([clean, sample(2)]))  # ids 600..1199 are new, not odd
    v2 = commit(ctx, tmp_path / "d", appended)
    assert flagged(v2) == []
    copies = with_ids(pa.concat_tables([clean, sample(2), clean.slice(0, 200)]))
    v3 = commit(ctx, tmp_path / "d", copies)  # the copies carry fresh ids 1200..1399

    assert flagged(v3) == ["duplicates"]
    message = signals(v3)["duplicates"].message
    assert "duplicate rows 0.0% -> 0.0% (0 in all)" in message  # the ids make every row unique
    assert "near-duplicates 0.0% -> " in message and "(200 in all)" in message
    assert "row 1200 (id=1200, " in message


def test_chance_repeats_in_a_larger_version_are_not_a_jump(ctx: Context, tmp_path: Path) -> None:
    def coarse(seed: int, n: int) -> pa.Table:  # few distinct rows: repeats grow with n alone
        rng = np.random.default_rng(seed)
        return pa.table({"a": rng.integers(0, 30, n), "b": rng.choice(["x", "y", "z"], n)})

    commit(ctx, tmp_path / "d", coarse(1, 100), suite=None)

    v2 = commit(ctx, tmp_path / "d", coarse(2, 2000), suite=None)

    found = signals(v2)
    assert found["duplicates"].passed, found["duplicates"].message
    assert "at 100 rows each" in found["duplicates"].message
    assert found["duplicates"].message.startswith("duplicate rows 34.0% -> 37.0% (1910 in all)")


def test_a_small_parents_range_bounds_nothing(ctx: Context, tmp_path: Path) -> None:
    commit(ctx, tmp_path / "d", sample(1, n=12), suite=None)

    v2 = commit(ctx, tmp_path / "d", sample(2), suite=None)  # many rows beyond 12 rows' range

    found = signals(v2)["out_of_range"]
    assert found.passed and found.message == (
        "not computed: the parent has 12 rows, fewer than the 30 that bound a range"
    )
