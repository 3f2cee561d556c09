"""Where a job's workers go: a mutable view of what the nodes have free, and the packing rules.

Pure (no I/O, no clock). ``FreeCapacity.of(snapshot)`` is the nodes minus what the running jobs
hold; ``place`` finds a placement for a pending job without changing anything, ``take`` commits
one and ``give_back`` returns one (a job that ends, or a victim in a preemption simulation).

Packing rules (``Snapshot.packing``):

- ``"nodes"``: every worker lies entirely on one node: its CPUs, memory and its whole GPUs
  (of the asked ``gpu_type``) are on that node. A worker asking for a fraction of a GPU gets a
  share of one device, best-fit onto devices that are already shared (the shares on a device
  never sum to more than 1, and their memory bounds never exceed the device's memory when that
  is known), else a whole free device on the node with the fewest free devices. Whole-GPU
  workers go best-fit too: onto the node with the fewest free devices that holds them, so a
  worker asking for all of a node's GPUs takes a whole free node. A gang is packed onto as few
  nodes as possible: all remaining workers on the tightest node that holds them all, else as
  many as fit on the node that holds the most, and so on.
- ``"count"``: GPUs, CPUs and memory are counted cluster-wide (the simulator's GPU-count-only
  rule): a worker's GPUs may lie on several nodes, so its placement has one ``WorkerPlacement``
  per node it spans (still in rank order). Fractions still go onto one device.

Unhealthy nodes get nothing new; what runs on them is still counted as held.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from operator import is_

from shipyard.compute.policy.base import (
    EPSILON,
    Demand,
    Node,
    Packing,
    PendingJob,
    Placement,
    RunningJob,
    Snapshot,
    WorkerPlacement,
    gpu_matches,
)

Job = PendingJob | RunningJob

_WHOLE = 1.0 - EPSILON
_NOTHING: set[int] = set()  # never mutated
_FIRST = [list(range(n)) for n in range(33)]  # the first n devices of a wholly free node


class _Static:
    """What does not change between decisions on the same nodes (shared by every view)."""

    __slots__ = (
        "cpus",
        "gidx",
        "gpos",
        "gtot",
        "healthy",
        "ident",
        "ids",
        "index",
        "mem",
        "models",
        "nodes",
        "shapes",
        "type_cache",
        "workers_at",
    )

    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = tuple(nodes)
        self.ids = [n.id for n in nodes]
        self.index = {n.id: i for i, n in enumerate(nodes)}
        self.healthy = [n.healthy for n in nodes]
        self.cpus = [float(n.cpus) for n in nodes]
        self.mem = [float(n.memory_mb) for n in nodes]
        self.gtot = [[g.memory_mb for g in n.gpus] for n in nodes]
        self.gidx = [[g.index for g in n.gpus] for n in nodes]
        self.ident = [gidx == list(range(len(gidx))) for gidx in self.gidx]
        self.gpos = [{g.index: j for j, g in enumerate(n.gpus)} for n in nodes]
        self.models = [[g.model for g in n.gpus] for n in nodes]
        self.type_cache: dict[str, list[tuple[int, ...]]] = {}
        self.shapes: list[tuple[Node, int]] | None = None
        self.workers_at: dict[tuple[int, tuple[int, ...]], tuple[WorkerPlacement]] = {}


_last_static: list[_Static] = []  # the nodes of the latest decision: the same list next time


def _static(nodes: Sequence[Node]) -> _Static:
    """The static view of ``nodes``, reused while the very same (frozen) node objects come."""
    if _last_static:
        cached = _last_static[0]
        old = cached.nodes
        if len(old) == len(nodes) and all(map(is_, old, nodes)):
            return cached
    static = _Static(nodes)
    _last_static[:] = [static]
    return static


class FreeCapacity:
    """What every node has free, indexed so that placing one job is fast on a large cluster."""

    __slots__ = (
        "_buckets",
        "_cpus",
        "_gidx",
        "_gmem",
        "_gpos",
        "_gtot",
        "_healthy",
        "_holes",
        "_ident",
        "_ids",
        "_index",
        "_mem",
        "_models",
        "_pool_cpus",
        "_pool_mem",
        "_share",
        "_shared",
        "_shared_holes",
        "_skip_cache",
        "_type_cache",
        "_units",
        "_whole",
        "_workers_at",
    )

    _ids: list[str]
    _index: dict[str, int]
    _healthy: list[bool]
    _cpus: list[float]
    _mem: list[float]
    _share: list[list[float]]  # free share of each device (1 = free, 0 = fully held)
    _gmem: list[list[float]]  # free memory of each device (meaningful when _gtot > 0)
    _gtot: list[list[int]]  # memory of each device (0 = unknown: no memory bound checked)
    _gidx: list[list[int]]  # the device index (CUDA_VISIBLE_DEVICES) of each position
    _gpos: list[dict[int, int]]  # device index -> position
    _ident: list[bool]  # whether a node's device indices are its positions (0, 1, 2...)
    _skip_cache: dict[frozenset[str], set[int]]
    _workers_at: dict[tuple[int, tuple[int, ...]], tuple[WorkerPlacement]]
    _models: list[list[str]]
    _whole: list[int]  # free whole devices per node
    _buckets: list[dict[int, None]]  # free whole devices -> healthy nodes with that many
    _holes: list[int]  # deletions from each bucket since it was last rebuilt
    _shared: dict[tuple[int, int], None]  # partly held devices on healthy nodes
    _shared_holes: int
    _units: float  # free GPU units on healthy nodes (sum of free shares)
    _pool_cpus: float  # free CPUs and memory on healthy nodes (the "count" rule's pools)
    _pool_mem: float
    _type_cache: dict[str, list[tuple[int, ...]]]  # gpu_type -> per node, matching positions

    # -- building -------------------------------------------------------------------------------

    @classmethod
    def of(cls, snapshot: Snapshot) -> FreeCapacity:
        """The nodes of ``snapshot`` minus what its running jobs hold (stopping ones included)."""
        self = cls._blank(snapshot.nodes)
        index = self._index
        cpus, mem, share, gmem, gtot, gpos = (
            self._cpus,
            self._mem,
            self._share,
            self._gmem,
            self._gtot,
            self._gpos,
        )
        count = snapshot.packing == "count"
        held_cpus = 0.0
        held_mem = 0.0
        for job in snapshot.running:
            demand = job.demand
            if count:
                held_cpus += demand.cpus * job.workers
                held_mem += demand.memory_mb * job.workers
            for wp in job.placement.workers:
                i = index.get(wp.node_id)
                if i is None:
                    continue
                if not count:
                    cpus[i] -= demand.cpus
                    mem[i] -= demand.memory_mb
                if not wp.gpus:
                    continue
                frac = wp.gpu_share
                for g in wp.gpus:
                    j = gpos[i].get(g)
                    if j is None:
                        continue
                    if frac > 0:
                        share[i][j] -= frac
                        gmem[i][j] -= demand.gpu_memory_mb
                    else:
                        share[i][j] -= 1.0
                        gmem[i][j] -= gtot[i][j]
        self._reindex()
        if count:
            self._pool_cpus -= held_cpus
            self._pool_mem -= held_mem
        return self

    @classmethod
    def empty(cls, nodes: Sequence[Node]) -> FreeCapacity:
        """All of ``nodes`` free."""
        self = cls._blank(nodes)
        self._reindex()
        return self

    @classmethod
    def _blank(cls, nodes: Sequence[Node]) -> FreeCapacity:
        """Every node free, before the indexes are built (``_reindex``)."""
        static = _static(nodes)
        self = cls.__new__(cls)
        self._ids = static.ids
        self._index = static.index
        self._healthy = static.healthy
        self._gtot = static.gtot
        self._gidx = static.gidx
        self._gpos = static.gpos
        self._ident = static.ident
        self._skip_cache = {}
        self._workers_at = static.workers_at
        self._models = static.models
        self._type_cache = static.type_cache
        self._cpus = static.cpus.copy()
        self._mem = static.mem.copy()
        self._share = [[1.0] * len(g) for g in static.gidx]
        self._gmem = [[float(m) for m in g] for g in static.gtot]
        return self

    def _reindex(self) -> None:
        """Whole-device counts, buckets, shared devices and pools from the per-node arrays."""
        most = max((len(s) for s in self._share), default=0)
        buckets: list[dict[int, None]] = [{} for _ in range(most + 1)]
        shared: dict[tuple[int, int], None] = {}
        whole: list[int] = []
        units = 0.0
        pool_cpus = 0.0
        pool_mem = 0.0
        healthy = self._healthy
        cpus = self._cpus
        mem = self._mem
        for i, share in enumerate(self._share):
            k = 0
            for j, s in enumerate(share):
                if s >= _WHOLE:
                    k += 1
                elif s > EPSILON and healthy[i]:
                    shared[(i, j)] = None
            whole.append(k)
            if healthy[i]:
                buckets[k][i] = None
                units += (
                    sum(share) if not share or min(share) >= 0 else sum(x for x in share if x > 0)
                )
                pool_cpus += cpus[i]
                pool_mem += mem[i]
        self._whole = whole
        self._buckets = buckets
        self._holes = [0] * len(buckets)
        self._shared_holes = 0
        self._shared = shared
        self._units = units
        self._pool_cpus = pool_cpus
        self._pool_mem = pool_mem

    def copy(self) -> FreeCapacity:
        """An independent copy (for what-if simulations: backfill shadows, preemption)."""
        other = FreeCapacity.__new__(FreeCapacity)
        other._ids = self._ids  # never mutated
        other._index = self._index
        other._healthy = self._healthy
        other._gtot = self._gtot
        other._gidx = self._gidx
        other._gpos = self._gpos
        other._ident = self._ident
        other._skip_cache = self._skip_cache
        other._workers_at = self._workers_at
        other._models = self._models
        other._type_cache = self._type_cache
        other._cpus = self._cpus.copy()
        other._mem = self._mem.copy()
        other._share = [s.copy() for s in self._share]
        other._gmem = [m.copy() for m in self._gmem]
        other._whole = self._whole.copy()
        other._buckets = [dict(b) for b in self._buckets]  # rebuilt: without holes
        other._holes = [0] * len(self._buckets)
        other._shared = dict(self._shared)
        other._shared_holes = 0
        other._units = self._units
        other._pool_cpus = self._pool_cpus
        other._pool_mem = self._pool_mem
        return other

    # -- reading --------------------------------------------------------------------------------

    def total_free_gpus(self) -> float:
        """Free GPU units on healthy nodes (whole free devices plus free shares)."""
        return max(self._units, 0.0)

    def most_free_gpus_on_a_node(self) -> int:
        """The most whole free devices any healthy node has."""
        buckets = self._buckets
        for k in range(len(buckets) - 1, 0, -1):
            if buckets[k]:
                return k
        return 0

    def free_cpus(self) -> float:
        return self._pool_cpus

    def free_memory_mb(self) -> float:
        return self._pool_mem

    def node_free(self, node_id: str) -> tuple[float, float, int]:
        """(free CPUs, free memory MB, free whole GPUs) of one node."""
        i = self._index[node_id]
        return self._cpus[i], self._mem[i], self._whole[i]

    # -- committing -----------------------------------------------------------------------------

    def take(self, job: Job, placement: Placement, *, packing: Packing = "nodes") -> None:
        """Mark ``placement`` (of ``job``) as held."""
        if packing == "nodes" and not job.demand.gpu_fraction and self._take_free(job, placement):
            return
        self._apply(job, placement, -1.0, packing)

    def _take_free(self, job: Job, placement: Placement) -> bool:
        """``take`` in its common case, fast: whole devices that are all free now, on healthy
        nodes with device indices 0, 1, 2... False (nothing changed) when that is not so."""
        index = self._index
        share = self._share
        spots: list[tuple[int, tuple[int, ...]]] = []
        gang = len(placement.workers) > 1
        seen: set[tuple[int, int]] = set()
        for wp in placement.workers:
            i = index.get(wp.node_id)
            if i is None or not self._healthy[i] or not self._ident[i] or wp.gpu_share:
                return False
            row = share[i]
            for g in wp.gpus:
                if g >= len(row) or row[g] < _WHOLE:
                    return False
                if gang:
                    if (i, g) in seen:
                        return False  # two workers naming one device: let _apply count it
                    seen.add((i, g))
            spots.append((i, wp.gpus))
        demand = job.demand
        c = demand.cpus
        m = demand.memory_mb
        cpus, mem, gmem, gtot, whole = self._cpus, self._mem, self._gmem, self._gtot, self._whole
        for i, gpus in spots:
            cpus[i] -= c
            mem[i] -= m
            self._pool_cpus -= c
            self._pool_mem -= m
            if not gpus:
                continue
            row = share[i]
            for g in gpus:
                row[g] -= 1.0
                gmem[i][g] -= gtot[i][g]
            before = whole[i]
            after = whole[i] = before - len(gpus)
            self._units -= len(gpus)
            self._move(i, before, after)
        return True

    def give_back(self, job: Job, placement: Placement, *, packing: Packing = "nodes") -> None:
        """Mark ``placement`` (of ``job``) as free again."""
        self._apply(job, placement, 1.0, packing)

    def can_take(self, job: Job, placement: Placement, *, packing: Packing = "nodes") -> bool:
        """Whether everything ``placement`` names is free here (another view's placement)."""
        demand = job.demand
        if packing == "count":
            if demand.cpus * job.workers > self._pool_cpus + EPSILON:
                return False
            if demand.memory_mb * job.workers > self._pool_mem + EPSILON:
                return False
        need: dict[int, list[float]] = {}  # node -> [cpus, memory]
        shares: dict[tuple[int, int], list[float]] = {}  # device -> [share, memory]
        for wp in placement.workers:
            i = self._index.get(wp.node_id)
            if i is None or not self._healthy[i]:
                return False
            if packing == "nodes":
                entry = need.setdefault(i, [0.0, 0.0])
                entry[0] += demand.cpus
                entry[1] += demand.memory_mb
            for g in wp.gpus:
                j = self._gpos[i].get(g)
                if j is None:
                    return False
                dev = shares.setdefault((i, j), [0.0, 0.0])
                if wp.gpu_share > 0:
                    dev[0] += wp.gpu_share
                    dev[1] += demand.gpu_memory_mb
                else:
                    dev[0] += 1.0
        for i, (cpus, mem) in need.items():
            if cpus > self._cpus[i] + EPSILON or mem > self._mem[i] + EPSILON:
                return False
        for (i, j), (share, mem) in shares.items():
            if share > self._share[i][j] + EPSILON:
                return False
            if share < _WHOLE and self._gtot[i][j] and mem > self._gmem[i][j] + EPSILON:
                return False
        return True

    def _apply(self, job: Job, placement: Placement, sign: float, packing: Packing) -> None:
        demand = job.demand
        index = self._index
        if packing == "count":
            self._pool_cpus += sign * demand.cpus * job.workers
            self._pool_mem += sign * demand.memory_mb * job.workers
        for wp in placement.workers:
            i = index.get(wp.node_id)
            if i is None:
                continue  # a node that is gone: nothing to count
            healthy = self._healthy[i]
            if packing == "nodes":
                self._cpus[i] += sign * demand.cpus
                self._mem[i] += sign * demand.memory_mb
                if healthy:
                    self._pool_cpus += sign * demand.cpus
                    self._pool_mem += sign * demand.memory_mb
            if not wp.gpus:
                continue
            share = self._share[i]
            gmem = self._gmem[i]
            gtot = self._gtot[i]
            gpos = self._gpos[i]
            before = self._whole[i]
            if wp.gpu_share <= 0:
                # whole devices (the common case): free <-> held, never shared
                for g in wp.gpus:
                    j = gpos.get(g)
                    if j is None:
                        continue
                    old = share[j]
                    new = old + sign
                    share[j] = new
                    if sign > 0:
                        gmem[j] = float(gtot[j])
                    else:
                        gmem[j] -= gtot[j]
                    if healthy:
                        # units count what is free: a device held twice over (a what-if view
                        # that holds a placement on capacity not free yet) stays at 0
                        self._units += (new if new > 0 else 0.0) - (old if old > 0 else 0.0)
                        if EPSILON < new < _WHOLE or EPSILON < old < _WHOLE:
                            self._mark_shared(i, j, new)
                    if old >= _WHOLE and new < _WHOLE:
                        self._whole[i] -= 1
                    elif old < _WHOLE and new >= _WHOLE:
                        self._whole[i] += 1
                after = self._whole[i]
                if healthy and after != before:
                    self._move(i, before, after)
                continue
            for g in wp.gpus:
                j = gpos.get(g)
                if j is None:
                    continue
                old = share[j]
                if wp.gpu_share > 0:
                    amount = wp.gpu_share
                    gmem[j] += sign * demand.gpu_memory_mb
                else:
                    amount = 1.0
                    gmem[j] = float(gtot[j]) if sign > 0 else gmem[j] - gtot[j]
                new = old + sign * amount
                share[j] = new
                if healthy:
                    self._units += (new if new > 0 else 0.0) - (old if old > 0 else 0.0)
                    key = (i, j)
                    if EPSILON < new < _WHOLE:
                        self._shared[key] = None
                    else:
                        self._unshare(key)
                if old >= _WHOLE and new < _WHOLE:
                    self._whole[i] -= 1
                elif old < _WHOLE and new >= _WHOLE:
                    self._whole[i] += 1
            after = self._whole[i]
            if healthy and after != before:
                self._move(i, before, after)

    def _move(self, i: int, before: int, after: int) -> None:
        """Node ``i`` now has ``after`` whole free devices instead of ``before``."""
        buckets = self._buckets
        bucket = buckets[before]
        del bucket[i]
        holes = self._holes[before] + 1
        if holes > 32 and holes > len(bucket):
            # A dict iterates over the holes deletions leave; rebuilt, it iterates only keys.
            buckets[before] = dict(bucket)
            holes = 0
        self._holes[before] = holes
        buckets[after][i] = None

    def _mark_shared(self, i: int, j: int, share: float) -> None:
        if EPSILON < share < _WHOLE:
            self._shared[(i, j)] = None
        else:
            self._unshare((i, j))

    def _unshare(self, key: tuple[int, int]) -> None:
        shared = self._shared
        if shared.pop(key, 0) is None:
            self._shared_holes += 1
            if self._shared_holes > 32 and self._shared_holes > len(shared):
                self._shared = dict(shared)
                self._shared_holes = 0

    # -- placing --------------------------------------------------------------------------------

    def place(
        self, job: Job, packing: Packing = "nodes", *, exclude: Collection[str] = ()
    ) -> Placement | None:
        """Where ``job``'s workers would go now (all of them, or None); nothing is changed.

        ``exclude``: node ids not to use (e.g. those a backfill reservation holds).
        """
        demand = job.demand
        workers = job.workers
        # Quick refusals first: they are what a busy cluster answers most of the time.
        need_units = demand.gpu_units * workers
        if need_units > self._units + EPSILON:
            return None
        if packing == "count":
            if demand.cpus * workers > self._pool_cpus + EPSILON:
                return None
            if demand.memory_mb * workers > self._pool_mem + EPSILON:
                return None
            return self._place_count(job, exclude)
        skip = self._skip(exclude) if exclude else _NOTHING
        g = demand.gpus
        if g and not demand.gpu_fraction and workers == 1:
            return self._place_single(job, g, skip)
        if g and g > self.most_free_gpus_on_a_node():
            return None
        if g and not demand.gpu_fraction:
            workers_at = self._place_whole(demand, workers, skip)
            if workers_at is None:
                return None
            return Placement(job_id=job.id, workers=tuple(workers_at))
        return self._place_one_by_one(job, skip)

    def _skip(self, exclude: Collection[str]) -> set[int]:
        """Node positions of ``exclude`` (cached for frozensets: a reservation's nodes)."""
        if isinstance(exclude, frozenset):
            cached = self._skip_cache.get(exclude)
            if cached is None:
                cached = self._skip_cache[exclude] = {
                    self._index[n] for n in exclude if n in self._index
                }
            return cached
        return {self._index[n] for n in exclude if n in self._index}

    def _place_single(self, job: Job, g: int, skip: set[int]) -> Placement | None:
        """The common case, fast: one worker of ``g`` whole GPUs, best fit, nothing excluded."""
        demand = job.demand
        buckets = self._buckets
        if g >= len(buckets):
            return None
        c = demand.cpus - EPSILON
        m = demand.memory_mb - EPSILON
        cpus = self._cpus
        mem = self._mem
        gpu_type = demand.gpu_type
        typed = self._matching(gpu_type) if gpu_type is not None else None
        for k in range(g, len(buckets)):
            for i in buckets[k]:
                if cpus[i] < c or mem[i] < m or (skip and i in skip):
                    continue
                share = self._share[i]
                if typed is None:
                    if k == len(share):
                        devices = _FIRST[g] if g < len(_FIRST) else list(range(g))
                    else:
                        devices = []
                        for j, s in enumerate(share):
                            if s >= _WHOLE:
                                devices.append(j)
                                if len(devices) == g:
                                    break
                else:
                    devices = [j for j in typed[i] if share[j] >= _WHOLE]
                    if len(devices) < g:
                        continue
                if self._ident[i]:
                    gpus = tuple(devices[:g])
                else:
                    gidx = self._gidx[i]
                    gpus = tuple([gidx[j] for j in devices[:g]])
                # WorkerPlacement is frozen: one object per (node, devices) serves every job
                workers = self._workers_at.get((i, gpus))
                if workers is None:
                    if len(self._workers_at) > 100_000:
                        self._workers_at.clear()  # bounded: device subsets of many nodes
                    wp = WorkerPlacement(node_id=self._ids[i], gpus=gpus)
                    workers = self._workers_at[(i, gpus)] = (wp,)
                return Placement(job_id=job.id, workers=workers)
        return None

    def _matching(self, gpu_type: str) -> list[tuple[int, ...]]:
        cached = self._type_cache.get(gpu_type)
        if cached is None:
            cached = [
                tuple(j for j, model in enumerate(models) if gpu_matches(model, gpu_type))
                for models in self._models
            ]
            self._type_cache[gpu_type] = cached
        return cached

    def _free_whole(self, i: int, gpu_type: str | None) -> list[int]:
        share = self._share[i]
        if gpu_type is None:
            return [j for j, s in enumerate(share) if s >= _WHOLE]
        return [j for j in self._matching(gpu_type)[i] if share[j] >= _WHOLE]

    def _place_whole(
        self, demand: Demand, workers: int, skip: set[int]
    ) -> list[WorkerPlacement] | None:
        g = demand.gpus
        c = demand.cpus
        m = demand.memory_mb
        gpu_type = demand.gpu_type
        typed = self._matching(gpu_type) if gpu_type is not None else None
        buckets = self._buckets
        top = len(buckets) - 1
        cpus = self._cpus
        mem = self._mem
        share = self._share
        used = set(skip)
        result: list[WorkerPlacement] = []
        left = workers
        while left:
            # 1. the tightest node that holds every remaining worker
            chosen = -1
            count = 0
            lo = g * left
            if lo <= top:
                want_c = c * left - EPSILON
                want_m = m * left - EPSILON
                for k in range(lo, top + 1):
                    for i in buckets[k]:
                        if i in used or cpus[i] < want_c or mem[i] < want_m:
                            continue
                        if typed is not None:
                            free = sum(1 for j in typed[i] if share[i][j] >= _WHOLE)
                            if free < lo:
                                continue
                        chosen, count = i, left
                        break
                    if chosen >= 0:
                        break
            if chosen < 0:
                # 2. else the node that holds the most workers (gangs only)
                if workers == 1:
                    return None
                best = 0
                for k in range(top, g - 1, -1):
                    if k // g <= best:
                        break  # no node in a lower bucket can hold more
                    for i in buckets[k]:
                        if i in used:
                            continue
                        free = (
                            k
                            if typed is None
                            else sum(1 for j in typed[i] if share[i][j] >= _WHOLE)
                        )
                        fit = free // g
                        if c > 0:
                            fit = min(fit, int((cpus[i] + EPSILON) // c))
                        if m > 0:
                            fit = min(fit, int((mem[i] + EPSILON) // m))
                        if fit > best:
                            best, chosen = fit, i
                            if fit >= k // g:
                                break
                if best == 0:
                    return None
                count = min(best, left)
            devices = self._free_whole(chosen, gpu_type)
            gidx = self._gidx[chosen]
            node_id = self._ids[chosen]
            for w in range(count):
                picked = devices[w * g : (w + 1) * g]
                result.append(
                    WorkerPlacement(node_id=node_id, gpus=tuple([gidx[j] for j in picked]))
                )
            used.add(chosen)
            left -= count
        return result

    def _place_one_by_one(self, job: Job, skip: set[int]) -> Placement | None:
        """Fractional-GPU and CPU-only workers: each placed and held in turn, then released."""
        demand = job.demand
        done: list[WorkerPlacement] = []
        try:
            for _ in range(job.workers):
                wp = self._place_worker(demand, skip)
                if wp is None:
                    return None
                self._apply(job, Placement(job_id=job.id, workers=(wp,)), -1.0, "nodes")
                done.append(wp)
            return Placement(job_id=job.id, workers=tuple(done))
        finally:
            if done:
                self._apply(job, Placement(job_id=job.id, workers=tuple(done)), 1.0, "nodes")

    def _place_worker(
        self, demand: Demand, skip: set[int], *, node_check: bool = True
    ) -> WorkerPlacement | None:
        c = demand.cpus - EPSILON
        m = demand.memory_mb - EPSILON
        cpus = self._cpus
        mem = self._mem
        typed = self._matching(demand.gpu_type) if demand.gpu_type is not None else None
        if demand.gpu_fraction > 0:
            f = demand.gpu_fraction - EPSILON
            gm = demand.gpu_memory_mb - EPSILON
            best: tuple[int, int] | None = None
            best_left = 2.0
            for i, j in self._shared:
                if i in skip:
                    continue
                s = self._share[i][j]
                if s < f or (self._gtot[i][j] and self._gmem[i][j] < gm):
                    continue
                if node_check and (cpus[i] < c or mem[i] < m):
                    continue
                if typed is not None and j not in typed[i]:
                    continue
                if s < best_left:
                    best, best_left = (i, j), s
            if best is None:
                for k in range(1, len(self._buckets)):
                    for i in self._buckets[k]:
                        if i in skip or (node_check and (cpus[i] < c or mem[i] < m)):
                            continue
                        for j in self._free_whole(i, demand.gpu_type):
                            if not self._gtot[i][j] or self._gtot[i][j] >= gm:
                                best = (i, j)
                                break
                        if best is not None:
                            break
                    if best is not None:
                        break
            if best is None:
                return None
            i, j = best
            return WorkerPlacement(
                node_id=self._ids[i], gpus=(self._gidx[i][j],), gpu_share=demand.gpu_fraction
            )
        # CPU-only: prefer nodes without free GPUs, so GPU nodes stay whole for GPU work.
        for bucket in self._buckets:
            for i in bucket:
                if i in skip or cpus[i] < c or mem[i] < m:
                    continue
                return WorkerPlacement(node_id=self._ids[i])
        return None

    def _place_count(self, job: Job, exclude: Collection[str]) -> Placement | None:
        demand = job.demand
        skip = {self._index[n] for n in exclude if n in self._index} if exclude else set()
        if demand.gpu_fraction > 0 and not demand.gpus:
            done: list[WorkerPlacement] = []
            try:
                for _ in range(job.workers):
                    wp = self._place_worker(demand, skip, node_check=False)
                    if wp is None:
                        return None
                    self._apply_share(wp, demand, -1.0)
                    done.append(wp)
                return Placement(job_id=job.id, workers=tuple(done))
            finally:
                for wp in done:
                    self._apply_share(wp, demand, 1.0)
        if not demand.gpus:
            # CPUs and memory are pooled; the worker is recorded on any healthy node.
            node = next((i for i, ok in enumerate(self._healthy) if ok and i not in skip), None)
            if node is None:
                return None
            wp = WorkerPlacement(node_id=self._ids[node])
            return Placement(job_id=job.id, workers=(wp,) * job.workers)
        # Whole GPUs anywhere: take devices from the nodes with the fewest free ones first.
        needed = demand.gpus * job.workers
        devices: list[tuple[int, int]] = []
        for bucket in self._buckets[1:]:
            for i in bucket:
                if i in skip:
                    continue
                for j in self._free_whole(i, demand.gpu_type):
                    devices.append((i, j))
                    if len(devices) == needed:
                        break
                if len(devices) == needed:
                    break
            if len(devices) == needed:
                break
        if len(devices) < needed:
            return None
        chunks: list[WorkerPlacement] = []
        g = demand.gpus
        for w in range(job.workers):
            mine = devices[w * g : (w + 1) * g]
            by_node: dict[int, list[int]] = {}
            for i, j in mine:
                by_node.setdefault(i, []).append(self._gidx[i][j])
            for i, gpus in by_node.items():
                chunks.append(WorkerPlacement(node_id=self._ids[i], gpus=tuple(gpus)))
        return Placement(job_id=job.id, workers=tuple(chunks))

    def _apply_share(self, wp: WorkerPlacement, demand: Demand, sign: float) -> None:
        """Only the device share of one fractional worker (the "count" rule's tentative hold)."""
        probe = Demand(
            cpus=0.0,
            memory_mb=0,
            gpu_fraction=demand.gpu_fraction,
            gpu_memory_mb=demand.gpu_memory_mb,
        )
        job = PendingJob(id="", queue="", demand=probe)
        self._apply(job, Placement(job_id="", workers=(wp,)), sign, "nodes")


class FitCheck:
    """``never_fits`` for many jobs of one snapshot: answers from a cache, or at once when the
    cluster has a node at least as large as every other in every resource."""

    __slots__ = ("_cache", "_cpus", "_gpus", "_mem", "_packing", "_shapes")

    @property
    def dominating(self) -> tuple[float, float, float]:
        """(GPUs, CPUs, memory) of a node at least as large as every other in each (a job of
        one untyped whole-GPU worker within it fits), or -1s when there is none."""
        return self._gpus, self._cpus, self._mem

    def __init__(self, nodes: Sequence[Node], packing: Packing) -> None:
        static = _static(nodes)
        if static.shapes is None:
            static.shapes = node_shapes(nodes)
        self._shapes = static.shapes
        self._packing = packing
        self._cache: dict[tuple[Demand, int], str | None] = {}
        self._gpus = self._cpus = self._mem = -1.0  # no dominating node: always ask
        if nodes and packing == "nodes":
            top = max(nodes, key=lambda n: (len(n.gpus), n.cpus, n.memory_mb))
            if all(
                len(n.gpus) <= len(top.gpus) and n.cpus <= top.cpus and n.memory_mb <= top.memory_mb
                for n in nodes
            ):
                self._gpus, self._cpus, self._mem = (
                    float(len(top.gpus)),
                    float(top.cpus),
                    float(top.memory_mb),
                )

    def __call__(self, job: PendingJob | RunningJob) -> str | None:
        d = job.demand
        if (
            job.workers == 1
            and d.gpus <= self._gpus
            and d.cpus <= self._cpus
            and d.memory_mb <= self._mem
            and d.gpu_type is None
            and not d.gpu_fraction
        ):
            return None
        key = (d, job.workers)
        try:
            return self._cache[key]
        except KeyError:
            reason = self._cache[key] = _never_fits(self._shapes, job, self._packing)
            return reason


def never_fits(nodes: Sequence[Node], job: PendingJob | RunningJob, packing: Packing) -> str | None:
    """Why no node of the (empty) cluster could ever hold ``job``, or None when some could.

    The wording names the largest node, e.g. "needs 16 GPUs per worker; the largest node (n3)
    has 8 GPUs". A cluster without nodes answers None: the job waits for nodes to appear.
    """
    return _never_fits(node_shapes(nodes), job, packing)


def node_shapes(nodes: Sequence[Node]) -> list[tuple[Node, int]]:
    """The distinct node shapes (CPUs, memory, GPUs) with how many nodes have each, in order."""
    first: dict[tuple[object, ...], Node] = {}
    count: dict[tuple[object, ...], int] = {}
    for n in nodes:
        key = (n.cpus, n.memory_mb, tuple((g.model, g.memory_mb) for g in n.gpus))
        if key not in first:
            first[key] = n
        count[key] = count.get(key, 0) + 1
    return [(n, count[key]) for key, n in first.items()]


def _never_fits(
    shapes: list[tuple[Node, int]], job: PendingJob | RunningJob, packing: Packing
) -> str | None:
    if not shapes:
        return None
    nodes = [n for n, _ in shapes]
    count_of = {n.id: c for n, c in shapes}
    demand = job.demand
    workers = job.workers
    gpu_type = demand.gpu_type
    per_worker = " per worker" if workers > 1 else ""

    def matching(node: Node) -> list[int]:
        return [g.memory_mb for g in node.gpus if gpu_matches(g.model, gpu_type)]

    wants_gpu = demand.gpus > 0 or demand.gpu_fraction > 0
    if wants_gpu and gpu_type is not None and not any(matching(n) for n in nodes):
        models = sorted({g.model for n in nodes for g in n.gpus})
        have = ", ".join(models) if models else "none"
        return f"asks for GPU type {gpu_type!r}; no node has one (GPU models: {have})"
    typed = f" {gpu_type}" if gpu_type is not None else ""

    if packing == "count":
        total_gpus = sum(len(matching(n)) * count_of[n.id] for n in nodes)
        total_cpus = sum(n.cpus * count_of[n.id] for n in nodes)
        total_mem = sum(n.memory_mb * count_of[n.id] for n in nodes)
        if demand.gpus * workers > total_gpus:
            return f"needs {demand.gpus * workers}{typed} GPUs in all; the cluster has {total_gpus}"
        if demand.cpus * workers > total_cpus + EPSILON:
            return f"needs {_num(demand.cpus * workers)} CPUs in all; the cluster has " + _num(
                total_cpus
            )
        if demand.memory_mb * workers > total_mem:
            return (
                f"needs {demand.memory_mb * workers} MB of memory in all; the cluster has "
                f"{total_mem} MB"
            )
        return _fraction_never_fits(nodes, demand, matching, typed)

    # "nodes": one worker must fit on one node, with every resource on that node.
    def gpus_of(node: Node) -> int:
        return len(matching(node))

    biggest_gpu = max(nodes, key=gpus_of)
    if demand.gpus > gpus_of(biggest_gpu):
        return (
            f"needs {demand.gpus}{typed} GPUs{per_worker}; the largest node ({biggest_gpu.id}) "
            f"has {gpus_of(biggest_gpu)}"
        )
    biggest_cpu = max(nodes, key=lambda n: n.cpus)
    if demand.cpus > biggest_cpu.cpus + EPSILON:
        return (
            f"needs {_num(demand.cpus)} CPUs{per_worker}; the largest node ({biggest_cpu.id}) "
            f"has {_num(biggest_cpu.cpus)}"
        )
    biggest_mem = max(nodes, key=lambda n: n.memory_mb)
    if demand.memory_mb > biggest_mem.memory_mb:
        return (
            f"needs {demand.memory_mb} MB of memory{per_worker}; the largest node "
            f"({biggest_mem.id}) has {biggest_mem.memory_mb} MB"
        )
    fraction = _fraction_never_fits(nodes, demand, matching, typed)
    if fraction is not None:
        return fraction

    def holds(node: Node) -> int:
        """How many workers the empty node holds."""
        fit = workers
        if demand.gpus:
            fit = min(fit, gpus_of(node) // demand.gpus)
        elif demand.gpu_fraction > 0:
            devices = [
                mem
                for mem in matching(node)
                if not mem or not demand.gpu_memory_mb or mem >= demand.gpu_memory_mb
            ]
            per_device = int((1.0 + EPSILON) // demand.gpu_fraction)
            if demand.gpu_memory_mb:
                per_device_mem = [
                    (int(mem // demand.gpu_memory_mb) if mem else per_device) for mem in devices
                ]
                fit = min(fit, sum(min(per_device, k) for k in per_device_mem))
            else:
                fit = min(fit, per_device * len(devices))
        if demand.cpus > 0:
            fit = min(fit, int((node.cpus + EPSILON) // demand.cpus))
        if demand.memory_mb > 0:
            fit = min(fit, node.memory_mb // demand.memory_mb)
        return fit

    counts = [holds(n) * count_of[n.id] for n in nodes]
    if max(counts) == 0:
        best = biggest_gpu if wants_gpu else biggest_cpu
        return (
            f"needs {_demand_text(demand)}{per_worker} on one node; no node has all of it "
            f"(the largest node ({best.id}) has {_node_text(best)})"
        )
    if sum(counts) < workers:
        return (
            f"needs {workers} workers of {_demand_text(demand)} each; the whole cluster holds "
            f"only {sum(counts)} such workers (the largest node ({biggest_gpu.id}) has "
            f"{_node_text(biggest_gpu)})"
        )
    return None


def _fraction_never_fits(
    nodes: Sequence[Node], demand: Demand, matching: Callable[[Node], list[int]], typed: str
) -> str | None:
    if demand.gpu_fraction <= 0 or demand.gpus:
        return None
    devices = [m for n in nodes for m in matching(n)]
    if not devices:
        return f"needs a {_num(demand.gpu_fraction)} share of a{typed} GPU; no node has GPUs"
    if demand.gpu_memory_mb and all(m and m < demand.gpu_memory_mb for m in devices):
        largest = max(devices)
        return (
            f"needs {demand.gpu_memory_mb} MB on a shared{typed} GPU; the largest GPU has "
            f"{largest} MB"
        )
    return None


def _demand_text(demand: Demand) -> str:
    parts = []
    if demand.gpus:
        parts.append(f"{demand.gpus} GPUs")
    elif demand.gpu_fraction:
        parts.append(f"a {_num(demand.gpu_fraction)} GPU share")
    parts.append(f"{_num(demand.cpus)} CPUs")
    parts.append(f"{demand.memory_mb} MB")
    return ", ".join(parts)


def _node_text(node: Node) -> str:
    return f"{len(node.gpus)} GPUs, {_num(node.cpus)} CPUs, {node.memory_mb} MB"


def _num(value: float) -> str:
    return f"{value:g}"


__all__ = ["FitCheck", "FreeCapacity", "Job", "never_fits"]
