"""PyTorch datasets over a real committed version: random access, DataLoader workers (forked and
spawned), DDP ranks (simulated, from the environment, and real gloo processes) - each file read
exactly once per epoch across all of them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.utils.data as tdata

from shipyard.context import Context
from shipyard.data import datasets
from shipyard.data.torch import Sample, StreamingVersionDataset, VersionDataset
from shipyard.errors import IntegrityError, InvalidInputError
from tests.conftest import free_port
from tests.data.test_fs import _corrupt

P = "default"
N = 23  # not a multiple of any shard count used here
URL = f"shipyard://{P}/imgs@v1/"


def path_and_length(sample: Sample) -> tuple[str, int]:
    """A transform at module level, so spawned workers can unpickle it."""
    return sample.path, len(sample.data)


def as_tensor(sample: Sample) -> torch.Tensor:
    return torch.frombuffer(bytearray(sample.data), dtype=torch.uint8)


@pytest.fixture
def files(ctx: Context, tmp_path: Path, home_env: Path) -> dict[str, bytes]:
    root = tmp_path / "imgs"
    content: dict[str, bytes] = {}
    for i in range(N):
        rel = f"{'train' if i % 3 else 'val'}/{i:03d}.bin"
        content[rel] = bytes([i]) * (100 + i)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content[rel])
    (root / "README.txt").write_text("not an image")
    content["README.txt"] = b"not an image"
    datasets.commit_directory(ctx, project=P, name="imgs", source=root)
    return content


def _images(files: dict[str, bytes]) -> set[str]:
    return {p for p in files if p.endswith(".bin")}


def test_map_style_random_access_with_a_transform(files: dict[str, bytes]) -> None:
    ds: VersionDataset[tuple[str, int]] = VersionDataset(
        URL, transform=path_and_length, glob="**/*.bin"
    )
    assert len(ds) == N and ds.version == 1
    assert ds.paths == sorted(_images(files))
    assert ds[4] == (ds.paths[4], len(files[ds.paths[4]]))
    assert ds[-1][0] == ds.paths[-1]
    with pytest.raises(IndexError, match="out of range"):
        ds[N]
    raw = VersionDataset(f"shipyard://{P}/imgs/val")  # a folder; no transform: Samples
    assert all(s.path.startswith("val/") for s in raw)  # type: ignore[attr-defined]
    assert raw[0] == Sample(raw.paths[0], files[raw.paths[0]])


def test_map_style_through_a_shuffling_dataloader_with_workers(files: dict[str, bytes]) -> None:
    ds: VersionDataset[torch.Tensor] = VersionDataset(URL, transform=as_tensor, glob="train/*")
    loader = tdata.DataLoader(ds, batch_size=None, shuffle=True, num_workers=2)
    seen = sorted(int(t[0]) for t in loader)
    assert seen == sorted(i for i in range(N) if i % 3)


def _read_all(ds: StreamingVersionDataset[tuple[str, int]], **loader: object) -> list[str]:
    got = list(tdata.DataLoader(ds, batch_size=None, **loader))  # type: ignore[arg-type]
    return [str(path) for path, _ in got]


def test_iterable_workers_split_the_files_without_duplicates_or_gaps(
    files: dict[str, bytes],
) -> None:
    ds: StreamingVersionDataset[tuple[str, int]] = StreamingVersionDataset(
        URL, transform=path_and_length, glob="**/*.bin"
    )
    read = _read_all(ds, num_workers=2)
    assert Counter(read) == Counter(_images(files))  # every file once
    assert _read_all(ds) == sorted(_images(files))  # no workers: all, in order


def test_iterable_spawned_workers_unpickle_the_dataset(files: dict[str, bytes]) -> None:
    ds: StreamingVersionDataset[tuple[str, int]] = StreamingVersionDataset(
        URL, transform=path_and_length
    )
    read = _read_all(ds, num_workers=2, multiprocessing_context="spawn")
    assert Counter(read) == Counter(list(files))


@pytest.mark.parametrize("shuffle", [False, True])
def test_two_simulated_ranks_with_two_workers_each_partition_the_files(
    files: dict[str, bytes], shuffle: bool
) -> None:
    for epoch in (0, 1):
        per_rank: list[list[str]] = []
        for rank in (0, 1):
            ds: StreamingVersionDataset[tuple[str, int]] = StreamingVersionDataset(
                URL, transform=path_and_length, shuffle=shuffle, seed=7, rank=rank, world_size=2
            )
            ds.set_epoch(epoch)
            per_rank.append(_read_all(ds, num_workers=2))
        assert not set(per_rank[0]) & set(per_rank[1])
        assert Counter(per_rank[0] + per_rank[1]) == Counter(list(files))
        assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1


def test_shards_are_a_partition_for_any_layout(files: dict[str, bytes]) -> None:
    ds: StreamingVersionDataset[Sample] = StreamingVersionDataset(URL, shuffle=True, seed=3)
    for world, workers in [(1, 1), (2, 2), (3, 4), (5, 1), (30, 1)]:
        shards = [
            ds.shard(rank=r, world_size=world, worker=w, workers=workers)
            for r in range(world)
            for w in range(workers)
        ]
        flat = [i for shard in shards for i in shard]
        assert sorted(flat) == list(range(len(files))), (world, workers)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    first = ds.shard(rank=0, world_size=1, worker=0, workers=1)
    ds.set_epoch(1)
    assert ds.shard(rank=0, world_size=1, worker=0, workers=1) != first  # reshuffled
    with pytest.raises(InvalidInputError, match="rank 2 of world size 2"):
        ds.shard(rank=2, world_size=2, worker=0, workers=1)


def test_rank_and_world_size_from_the_environment(
    files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[str] = []
    for rank in ("0", "1", "2"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "3")
        ds: StreamingVersionDataset[tuple[str, int]] = StreamingVersionDataset(
            URL, transform=path_and_length
        )
        mine = _read_all(ds)
        assert len(mine) in (len(files) // 3, len(files) // 3 + 1)
        read += mine
    assert Counter(read) == Counter(list(files))
    monkeypatch.setenv("RANK", "first")
    with pytest.raises(InvalidInputError, match="RANK='first' is not an integer"):
        list(StreamingVersionDataset(URL))


_DDP_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch.distributed as dist
    import torch.utils.data as tdata
    from shipyard.data.torch import StreamingVersionDataset

    dist.init_process_group("gloo")
    ds = StreamingVersionDataset(sys.argv[1], shuffle=True, seed=1)
    loader = tdata.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=lambda s: s.path)
    json.dump({"rank": dist.get_rank(), "paths": list(loader)}, open(sys.argv[2], "w"))
    dist.destroy_process_group()
    """
)


def test_real_ddp_ranks_read_disjoint_shards(files: dict[str, bytes], tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    procs = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": "2",
        }
        out = tmp_path / f"rank{rank}.json"
        procs.append((subprocess.Popen([sys.executable, str(script), URL, str(out)], env=env), out))
    results = []
    for proc, out in procs:
        assert proc.wait(timeout=180) == 0
        results.append(json.loads(out.read_text()))
    assert {r["rank"] for r in results} == {0, 1}
    a, b = (set(r["paths"]) for r in results)
    assert not a & b
    assert Counter(results[0]["paths"] + results[1]["paths"]) == Counter(list(files))


def test_a_corrupted_file_fails_its_read_naming_it(ctx: Context, files: dict[str, bytes]) -> None:
    ds: VersionDataset[Sample] = VersionDataset(URL)
    index = ds.paths.index("train/001.bin")
    digest = next(
        f.digest
        for f in datasets.list_files(ctx, project=P, name="imgs")
        if f.path == ds.paths[index]
    )
    _corrupt(ctx, digest, at=5)
    with pytest.raises(IntegrityError, match=r"imgs@v1/train/001\.bin is corrupted"):
        ds[index]
    stream: StreamingVersionDataset[Sample] = StreamingVersionDataset(URL)
    with pytest.raises(IntegrityError, match=r"train/001\.bin"):
        list(stream)


def test_bad_urls_and_globs(files: dict[str, bytes]) -> None:
    with pytest.raises(InvalidInputError, match="no files matching"):
        VersionDataset(URL, glob="**/*.png")
    with pytest.raises(InvalidInputError, match="not a folder"):
        VersionDataset(f"{URL}README.txt")
    with pytest.raises(FileNotFoundError, match="no version 3"):
        StreamingVersionDataset(f"shipyard://{P}/imgs@v3/")
