"""PyTorch datasets over a dataset version's files.

``VersionDataset`` (map-style: random access by index, e.g. images with a shuffling sampler) and
``StreamingVersionDataset`` (iterable: each DataLoader worker of each DDP rank reads its own
shard) take a ``shipyard://PROJECT/DATASET@VERSION/[FOLDER]`` URL. The file list is resolved once,
when the dataset is built, so every worker and rank sees the same version even if a new one is
committed meanwhile; workers only read bytes (the blob store embedded, the server's blob route
otherwise), never the metadata database. Each item is ``transform(Sample(path, data))``, or the
``Sample`` itself without a transform; ``data`` is the whole file, verified against its digest
the first time this process reads it (``shipyard.data.fs``). For one large file, stream it with
``fsspec.open`` / ``Client().datasets.open`` instead.

Sharding of the iterable dataset: the (optionally shuffled, same seed and epoch on every rank)
file order is dealt round-robin over ``world_size * num_workers`` shards, shard
``rank * num_workers + worker_id``; every file goes to exactly one shard, so an epoch over all
ranks and workers reads each file once - no duplicates, no gaps. Shards differ in length by at
most one file. The rank and world size come from ``torch.distributed`` when it is initialised,
else from the ``RANK`` and ``WORLD_SIZE`` environment variables torchrun sets, else 0 and 1.

PyTorch is an optional dependency: this module is imported only by code that uses it.
"""

from __future__ import annotations

import os
import random
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, NamedTuple, TypeVar

from fsspec.utils import glob_translate

from shipyard.data.fs import ShipyardFileSystem, Source
from shipyard.domain.models import FileEntry
from shipyard.errors import InvalidInputError

try:
    import torch.distributed as dist
    import torch.utils.data as tdata
except ImportError as exc:  # pragma: no cover - torch is installed where this is tested
    raise ImportError(
        f"shipyard.data.torch needs PyTorch ({exc}): pip install torch (or 'shipyard[demo]')"
    ) from exc

T = TypeVar("T")


class Sample(NamedTuple):
    """One file: its path inside the version and its bytes."""

    path: str
    data: bytes


Transform = Callable[[Sample], Any]


class _VersionFiles:
    """The resolved file list of a version (or a folder of it), and how to read one."""

    def __init__(
        self,
        url: str,
        *,
        glob: str | None,
        fs: ShipyardFileSystem | None,
        storage_options: dict[str, Any],
    ) -> None:
        fs = fs or ShipyardFileSystem(**storage_options)
        location, tree = fs.resolve(url)
        if location.path and location.path not in tree.folders:
            raise InvalidInputError(
                f"{location.url} is not a folder of dataset {location.dataset!r} "
                f"v{tree.version.version}: give the version's root or one of its folders",
                field="url",
            )
        prefix = f"{location.path}/" if location.path else ""
        entries = [e for path, e in sorted(tree.files.items()) if path.startswith(prefix)]
        if glob:
            pattern = re.compile(glob_translate(glob))
            entries = [e for e in entries if pattern.fullmatch(e.path)]
        if not entries:
            how = f" matching {glob!r}" if glob else ""
            raise InvalidInputError(
                f"{location.url} has no files{how} (dataset {location.dataset!r} "
                f"v{tree.version.version} has {len(tree.files)})",
                field="glob" if glob else "url",
            )
        self.project = location.project
        self.dataset = str(location.dataset)
        self.version = tree.version.version
        self.entries: list[FileEntry] = entries
        self.source: Source = fs.source
        self._root = f"{location.project}/{location.dataset}@v{self.version}"

    @property
    def paths(self) -> list[str]:
        return [e.path for e in self.entries]

    def read(self, index: int) -> Sample:
        entry = self.entries[index]
        return Sample(entry.path, self.source.read_file(self.project, entry, root=self._root))


class VersionDataset(tdata.Dataset[T], Generic[T]):
    """Map-style: item ``i`` is file ``i`` of the version (sorted by path), transformed.

    ``glob`` keeps the files whose path inside the version matches it (``*`` within a folder,
    ``**`` across folders, e.g. ``images/**/*.png``). ``storage_options`` (``server``, ``token``,
    ``home``) go to :class:`ShipyardFileSystem` when ``fs`` is not given.
    """

    def __init__(
        self,
        url: str,
        *,
        transform: Transform | None = None,
        glob: str | None = None,
        fs: ShipyardFileSystem | None = None,
        **storage_options: Any,
    ) -> None:
        self.files = _VersionFiles(url, glob=glob, fs=fs, storage_options=storage_options)
        self.transform = transform

    @property
    def version(self) -> int:
        return self.files.version

    @property
    def paths(self) -> list[str]:
        return self.files.paths

    def __len__(self) -> int:
        return len(self.files.entries)

    def __getitem__(self, index: int) -> T:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} files")
        sample = self.files.read(index)
        return self.transform(sample) if self.transform else sample  # type: ignore[return-value]


class StreamingVersionDataset(tdata.IterableDataset[T], Generic[T]):
    """Iterable: this rank's and this DataLoader worker's shard of the version's files.

    ``shuffle`` reorders the files per epoch (``set_epoch``) with ``seed``, identically on every
    rank so that shards stay disjoint. ``rank``/``world_size`` override what is detected.
    ``prefetch`` files are read ahead by as many threads (reading and hashing release the GIL,
    so one worker can keep more than one idle core busy; on a loaded machine it costs more than
    it gains, hence off by default); items still come out in shard order, and at most
    ``prefetch`` files beyond the current one are held.
    """

    def __init__(
        self,
        url: str,
        *,
        transform: Transform | None = None,
        glob: str | None = None,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        prefetch: int = 0,
        fs: ShipyardFileSystem | None = None,
        **storage_options: Any,
    ) -> None:
        if prefetch < 0:
            raise InvalidInputError(f"prefetch must be >= 0, not {prefetch}", field="prefetch")
        self.files = _VersionFiles(url, glob=glob, fs=fs, storage_options=storage_options)
        self.transform = transform
        self.prefetch = prefetch
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._rank = rank
        self._world_size = world_size

    @property
    def version(self) -> int:
        return self.files.version

    @property
    def paths(self) -> list[str]:
        return self.files.paths

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (like ``DistributedSampler.set_epoch``) to reshuffle."""
        self.epoch = epoch

    def shard(self, *, rank: int, world_size: int, worker: int, workers: int) -> list[int]:
        """The file indices that ``worker`` of ``workers`` on ``rank`` of ``world_size`` reads."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidInputError(
                f"rank {rank} of world size {world_size} is not a rank: need 0 <= rank < size",
                field="rank",
            )
        if workers < 1 or not 0 <= worker < workers:
            raise InvalidInputError(f"worker {worker} of {workers} is not a worker", field="worker")
        order = list(range(len(self.files.entries)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[rank * workers + worker :: world_size * workers]

    def __iter__(self) -> Iterator[T]:
        rank, world_size = self._rank_and_size()
        info = tdata.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        indices = self.shard(rank=rank, world_size=world_size, worker=worker, workers=workers)
        for sample in self._samples(indices):
            yield self.transform(sample) if self.transform else sample  # type: ignore[misc]

    def _samples(self, indices: list[int]) -> Iterator[Sample]:
        if self.prefetch == 0 or len(indices) < 2:
            yield from map(self.files.read, indices)
            return
        # The first file is read here, before any thread starts: it opens the blob store (and
        # loads its pack index) once, instead of in every thread at the same moment.
        yield self.files.read(indices[0])
        indices = indices[1:]
        pending: deque[Future[Sample]] = deque()
        with ThreadPoolExecutor(self.prefetch, thread_name_prefix="shipyard-prefetch") as pool:
            try:
                for index in indices:
                    pending.append(pool.submit(self.files.read, index))
                    if len(pending) > self.prefetch:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # stopped early or failed: drop what is queued, wait for what runs
                for future in pending:
                    future.cancel()

    def _rank_and_size(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return self._rank or 0, self._world_size or 1
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidInputError(
            f"the environment variable {name}={raw!r} is not an integer (torchrun sets it)",
            field=name,
        ) from None


__all__ = ["Sample", "StreamingVersionDataset", "VersionDataset"]
