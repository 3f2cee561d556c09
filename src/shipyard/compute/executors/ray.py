"""The Ray executor: a job's workers run as actors in one placement group on a Ray cluster.

``shipyard server --executor ray://HEAD:10001`` (or ``SHIPYARD_EXECUTOR``) sends admitted jobs to
an existing Ray cluster. shipyard decides *admission* (``compute.policy``: quotas, fair share,
priorities, preemption); Ray does *placement*: one placement group per job attempt, a bundle per
worker (``{CPU, GPU, memory}``; ``--gpu-type`` adds a label selector: the nodes of that GPU
model), ``STRICT_PACK`` for one worker and ``PACK`` for a gang, so a gang uses as few nodes as
possible. The nodes Ray chose are in the job's ``executor_ref``.

**Connecting.** ``ray://HOST:PORT`` is Ray Client's address: the head node's client server
(``ray start --head`` listens on 10001 by default). Ray Client is what lets a shipyard server
that is not itself a Ray node use a cluster, so it is the one way we connect (install
``shipyard[ray]``, which brings ``ray[client]`` of the cluster's version). The cluster's nodes
must have ``shipyard`` installed (the same version, in the Python Ray's workers run): the actors
are ``executors.ray_actor.WorkerActor``. We connect lazily on first use, once per process, in
namespace ``shipyard``; after a failure we reconnect on a later call. When the cluster cannot be
reached every method raises ``ExecutorUnavailableError`` naming the address (the pipeline keeps
the jobs queued with that reason); a quick TCP probe of the address first makes that cheap.

**A job.** ``launch`` creates a *detached* placement group (``shipyard-<job>-<attempt>``, in one
Ray task: through Ray Client each placement-group call would be a task of its own), waits until
Ray has placed it (``PLACE_TIMEOUT_S``; not placed -> removed, ``ExecutorUnavailableError``, the
job goes back to the queue), then creates one detached, named actor per worker
(``job-<job>-<attempt>-<rank>``) in its bundle and returns without waiting for them, as the local
executor returns once its supervisor is spawned: actors and group outlive the server process
that launched them, and any server process finds them again by name. Each actor gets the code
snapshot (``ray.put`` once), unpacks it on its node, and runs the command in its own process
group with the job's environment (``compute.sandbox.job_env`` computed here - never our own
environment or the server's database/blob settings - plus its node's ``PATH``, its Ray GPUs in
``CUDA_VISIBLE_DEVICES`` and the torchrun variables; ``MASTER_ADDR``/``MASTER_PORT`` are rank 0's
node and a port free there, which the other ranks ask rank 0's actor for). Jobs run as the user
Ray's workers run as (a root server's job user applies to the local executor only).
**Declared outputs** (``--output``): the node has neither our database nor our blob store, so
when the job's process ends with an outcome (not a preemption) rank 0's actor uploads them from
its folder to the server (``launch.server_url``) with the job's token - the same confinement and
"shipyard: ..." notes as the local executor, appended to its log - before it reports itself
exited; ``observe`` passes the stored artifact paths on in ``Observation.outputs``. When the
server cannot be reached from the node, the log says so and the job's outcome is unchanged.
``observe`` polls the actors; when a job ends it copies their logs into the server's job log
(``records.log_path``), kills the actors and removes the placement group. While a job runs its
log is pulled from the actors into that same file (whole lines, every rank in the order they
arrive), so ``read_logs`` always reads one append-only file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from shipyard.compute import records, sandbox
from shipyard.compute.executors.base import (
    Executor,
    ExecutorUnavailableError,
    Launch,
    NodeInfo,
    Observation,
    StopReason,
)
from shipyard.compute.policy.base import Gpu, Node, Placement, WorkerPlacement, gpu_matches
from shipyard.compute.workers import DEFAULT_GRACE_S, describe_exit, gang_layout
from shipyard.domain.models import JobStatus, JobUsage
from shipyard.errors import InvalidInputError, InvalidStateError
from shipyard.settings import Settings

NAMESPACE = "shipyard"
SCHEME = "ray://"
# How long ``launch`` waits for Ray to place a job's placement group before it gives the job back
# to the queue (the cluster is busier than shipyard thought, e.g. another Ray user took it).
PLACE_TIMEOUT_S = 10.0
# How long ``launch`` waits for the placement-group task (a worker process on a busy head).
START_TIMEOUT_S = 120.0
# How long one look at the actors (``observe``, a log pull) waits for their answers.
CALL_TIMEOUT_S = 10.0
# How long ``observe`` waits for the workers' answers (one still starting answers a later look).
POLL_TIMEOUT_S = 0.5
# After a failed connection, calls fail fast with the same reason for this long.
RETRY_AFTER_S = 2.0
PROBE_TIMEOUT_S = 2.0
CONNECT_ATTEMPTS = 3
LOG_CHUNK = 1024 * 1024
# When one worker of a gang fails by itself, the others get this long after SIGTERM.
GANG_GRACE_S = DEFAULT_GRACE_S
LOG_TAIL_LINES = 15
LOG_TAIL_BYTES = 4096
MB = 1024 * 1024
# A Ray resource "accelerator_type:A100" (Ray's convention), or this node label, names the model
# of a node's GPUs; this label gives their memory (Ray does not know it).
ACCELERATOR_PREFIX = "accelerator_type:"
MODEL_LABEL = "ray.io/accelerator-type"
NODE_ID_LABEL = "ray.io/node-id"  # every Ray node has it: its node id (hex)
GPU_MEMORY_LABEL = "shipyard.io/gpu-memory-mb"

_connection_lock = threading.RLock()
_connected_address: str | None = None  # one Ray Client connection per process
_users: dict[str, int] = {}  # open executors per address
# Bumped by every new connection: handles, remote classes and tasks belong to the connection
# that made them, so an executor drops its caches when this moved on (a reconnect).
_generation = 0


@dataclass(frozen=True, slots=True)
class _Rank:
    """One worker as ``observe`` saw it."""

    rank: int
    poll: dict[str, Any] | None  # None: the actor is gone
    error: str = ""


class RayExecutor(Executor):
    """Jobs as Ray actors in placement groups (see the module docstring)."""

    name = "ray"

    def __init__(self, url: str, settings: Settings | None = None) -> None:
        self.url = url
        self.host, self.port = parse_url(url)
        self.address = f"{SCHEME}{self.host}:{self.port}"
        self.settings = settings
        self._down_until = 0.0
        self._down_reason = ""
        self._actor_class: Any = None
        self._group_tasks: dict[str, Any] | None = None
        self._handles: dict[str, Any] = {}  # actor name -> handle
        self._generation = -1  # the connection the caches above belong to
        self._open = True
        with _connection_lock:
            _users[self.address] = _users.get(self.address, 0) + 1

    # --- the executor ------------------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        with self._connected() as ray:
            return [_node_info(entry) for entry in ray.nodes()]

    def launch(self, ctx: Any, launch: Launch) -> dict[str, Any]:
        spec = launch.spec
        workers = int(getattr(spec, "workers", 1) or 1)
        resources = spec.resources
        fraction = getattr(resources, "gpu_fraction", None)
        bundle: dict[str, float] = {
            "CPU": float(resources.cpus),
            "memory": resources.memory_mb * MB,
        }
        gpus = float(resources.gpus) if resources.gpus else float(fraction or 0.0)
        if gpus:
            bundle["GPU"] = gpus
        code = ctx.blobs.get_bytes(launch.code_digest) if launch.code_digest else None
        env = self._job_env(ctx, launch)
        if launch.attempt > 1:  # a later attempt appends to the same log, as the local one
            _note(ctx, launch.job_id, f"shipyard: attempt {launch.attempt} started")
        strategy = "STRICT_PACK" if workers == 1 else "PACK"
        group_name = _group_name(launch.job_id, launch.attempt)
        names = [_actor_name(launch.job_id, launch.attempt, rank) for rank in range(workers)]
        with self._connected() as ray:
            from ray._raylet import PlacementGroupID
            from ray.util.placement_group import PlacementGroup
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            gpu_type = getattr(resources, "gpu_type", None)
            selector = _model_selector(ray, gpu_type) if gpu_type and gpus else None
            if gpu_type and gpus and selector is None:
                raise ExecutorUnavailableError(
                    f"no live node of the Ray cluster at {self.address} has a {gpu_type} GPU "
                    f"now; job {launch.job_id} stays queued"
                )
            # A launch of this very attempt that failed half-way (a crash between launch and
            # recording it) may have left actors; ``create_group`` replaces its group.
            self._kill(ray, names)
            tasks = self._tasks(ray)
            made = ray.get(
                tasks["create_group"].remote(
                    group_name,
                    [dict(bundle) for _ in range(workers)],
                    strategy,
                    PLACE_TIMEOUT_S,
                    selector,
                ),
                timeout=PLACE_TIMEOUT_S + START_TIMEOUT_S,
            )
            if made is None:
                raise ExecutorUnavailableError(
                    f"the Ray cluster at {self.address} cannot place job {launch.job_id}'s "
                    f"{_workers(workers)} ({_bundle_text(bundle)} each) now; it stays queued"
                )
            group = PlacementGroup(PlacementGroupID(bytes.fromhex(made["id"])))
            actors: list[Any] = []
            try:
                cls = self._worker_class(ray)
                for rank, name in enumerate(names):
                    actors.append(
                        cls.options(
                            name=name,
                            namespace=NAMESPACE,
                            lifetime="detached",
                            num_cpus=bundle["CPU"],
                            num_gpus=bundle.get("GPU", 0),
                            memory=bundle["memory"],
                            max_concurrency=8,
                            max_restarts=0,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                group, placement_group_bundle_index=rank
                            ),
                        ).remote(
                            job_id=launch.job_id,
                            attempt=launch.attempt,
                            rank=rank,
                            world_size=workers,
                            max_runtime_s=spec.max_runtime_s,
                            gpu_fraction=fraction if not resources.gpus else None,
                            gpu_memory_mb=getattr(resources, "gpu_memory_mb", None),
                        )
                    )
                # The workers' nodes are their bundles' (each actor runs in its bundle); GPUs
                # and rank 0's address each actor learns itself. Not waited for: the actors
                # start side by side, the next ``observe`` sees how they are.
                placement = Placement(
                    job_id=launch.job_id,
                    workers=tuple(WorkerPlacement(node_id=node) for node in made["nodes"]),
                )
                slots = gang_layout(placement)
                code_ref = ray.put(code) if code is not None else None
                outputs = _outputs_target(launch)
                for rank, actor in enumerate(actors):
                    actor.start.remote(
                        command=list(spec.command),
                        env=env,
                        code=code_ref,
                        slot={k: v for k, v in asdict(slots[rank]).items() if k != "gpus"},
                        rank0=actors[0] if rank else None,
                        served=launch.server_url is not None,
                        outputs=outputs if rank == 0 else None,
                    )
            except Exception as exc:
                if _is_connection_error(exc):
                    raise
                self._kill(ray, names)
                with contextlib.suppress(Exception):
                    ray.get(tasks["remove_group"].remote(group_name), timeout=CALL_TIMEOUT_S)
                raise ExecutorUnavailableError(
                    f"the Ray cluster at {self.address} could not start job {launch.job_id}'s "
                    f"workers: {_text(exc)}"
                ) from exc
            for name, actor in zip(names, actors, strict=True):
                self._handles[name] = actor
        # A worker that could not start its command reports it (exit 127) to the next observe.
        return {
            "namespace": NAMESPACE,
            "address": self.address,
            "actors": names,
            "placement_group": made["id"],
            "placement_group_name": group_name,
            "nodes": made["nodes"],
            "attempt": launch.attempt,
            "max_runtime_s": spec.max_runtime_s,
        }

    def observe(self, ctx: Any, refs: Mapping[str, Mapping[str, Any]]) -> dict[str, Observation]:
        out: dict[str, Observation] = {}
        pending: dict[str, Mapping[str, Any]] = {}
        for job_id, ref in refs.items():
            done = _read_result(ctx, job_id, ref)
            if done is not None:
                out[job_id] = done
            else:
                pending[job_id] = ref
        if not pending:
            return out
        with self._connected() as ray:
            looks = self._poll_all(ray, pending)
            for job_id, ref in pending.items():
                ranks = looks[job_id]
                sizes = {r.rank: int(r.poll.get("log_size") or 0) for r in ranks if r.poll}
                self._pull_logs(ctx, ray, job_id, ref, final=False, sizes=sizes)
                observation = self._judge(ctx, ray, job_id, ref, ranks)
                if observation.state != "running":
                    self._close_job(ctx, ray, job_id, ref, observation)
                out[job_id] = observation
        return out

    def stop(
        self,
        ctx: Any,
        job_id: str,
        ref: Mapping[str, Any],
        *,
        reason: StopReason,
        grace_s: float,
    ) -> None:
        if _read_result(ctx, job_id, ref) is not None:
            return
        with self._connected() as ray:
            for name in ref.get("actors", []):
                handle = self._actor(ray, name)
                if handle is not None:
                    handle.stop.remote(reason, float(grace_s))

    def read_logs(
        self, ctx: Any, job_id: str, ref: Mapping[str, Any] | None, *, offset: int, limit: int
    ) -> tuple[bytes, int]:
        if ref and ref.get("actors") and _read_result(ctx, job_id, ref) is None:
            # Running: pull what the actors have first. Ray being down costs the new lines only.
            with contextlib.suppress(ExecutorUnavailableError), self._connected() as ray:
                self._pull_logs(ctx, ray, job_id, ref, final=False)
        return _read_file(records.log_path(ctx, job_id), offset, limit)

    def close(self) -> None:
        # The connection is the process's, shared by every executor of this address: the last
        # one closed ends it.
        with _connection_lock:
            if self._open:
                self._open = False
                _users[self.address] = _users.get(self.address, 1) - 1
                if _users[self.address] <= 0 and _connected_address == self.address:
                    disconnect()

    # --- connection ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connected(self) -> Iterator[ModuleType]:
        """The ``ray`` module, connected to our cluster; ExecutorUnavailableError when it is not.

        Holds the process's Ray lock while the caller uses it (Ray Client is one connection)."""
        with _connection_lock:
            ray = self._connect()
            if self._generation != _generation:
                self._handles.clear()
                self._actor_class = None
                self._group_tasks = None
                self._generation = _generation
            try:
                yield ray
            except ExecutorUnavailableError:
                raise
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                self._disconnect(ray)
                raise self._unavailable(f"the connection was lost ({_text(exc)})") from exc

    def _connect(self) -> ModuleType:
        global _connected_address, _generation
        try:
            import ray
        except ImportError:
            raise InvalidStateError(
                f"executor {self.url!r} needs Ray: install shipyard with the ray extra "
                "(pip install 'shipyard[ray]')",
                field="executor",
            ) from None
        if _connected_address == self.address and ray.is_initialized():
            return ray
        if _connected_address is not None and _connected_address != self.address:
            raise ExecutorUnavailableError(
                f"this process is connected to the Ray cluster at {_connected_address}; it can "
                f"use one Ray cluster, not also {self.address}"
            )
        if time.monotonic() < self._down_until:
            raise ExecutorUnavailableError(self._down_reason)
        try:
            with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S):
                pass
        except OSError as exc:
            raise self._unavailable(f"nothing answers there ({exc.strerror or exc})") from None
        _no_proxy_for_loopback(self.host)
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                if ray.is_initialized():
                    ray.shutdown()
                ray.init(self.address, namespace=NAMESPACE, log_to_driver=False)
                break
            except Exception as exc:
                with contextlib.suppress(Exception):
                    ray.shutdown()
                # The client server starts a process per connection; on a busy head that start
                # fails now and then ("Initialization failure from server"): try again.
                if not isinstance(exc, ConnectionAbortedError) or attempt == CONNECT_ATTEMPTS:
                    raise self._unavailable(f"Ray Client could not connect ({_text(exc)})") from exc
        _connected_address = self.address
        _generation += 1
        self._down_until = 0.0
        return ray

    def _disconnect(self, ray: ModuleType) -> None:
        global _connected_address
        with contextlib.suppress(Exception):
            ray.shutdown()
        _connected_address = None

    def _unavailable(self, why: str) -> ExecutorUnavailableError:
        self._down_reason = (
            f"the Ray cluster at {self.address} is unreachable: {why}; jobs wait in the queue "
            "until it is back"
        )
        self._down_until = time.monotonic() + RETRY_AFTER_S
        return ExecutorUnavailableError(self._down_reason)

    def _worker_class(self, ray: ModuleType) -> Any:
        if self._actor_class is None:
            from shipyard.compute.executors.ray_actor import WorkerActor

            self._actor_class = ray.remote(WorkerActor)
        return self._actor_class

    # --- helpers ---------------------------------------------------------------------------------

    def _job_env(self, ctx: Any, launch: Launch) -> dict[str, str]:
        """The job's own variables (the actor adds its node's PATH, GPUs and ranks): the same
        allowlist as a local job, computed from nothing of ours (``parent_env={}``)."""
        env = sandbox.job_env(
            sandbox.LaunchedJob(
                job_id=launch.job_id, project=launch.project, run_id=launch.run_id, gpus=[]
            ),
            launch.spec.env,
            shipyard_url=launch.server_url,
            token=launch.token,
            settings=ctx.settings,
            parent_env={},
        )
        if "PATH" not in launch.spec.env:
            env.pop("PATH", None)  # the node's own PATH, which the actor adds
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the actor's Ray GPUs
        env["SHIPYARD_ATTEMPT"] = str(launch.attempt)
        return env

    def _kill(self, ray: ModuleType, names: list[str]) -> None:
        """Kill the named actors that exist (and forget their handles)."""
        for name in names:
            handle = self._handles.pop(name, None) or _actor(ray, name)
            if handle is not None:
                with contextlib.suppress(Exception):
                    ray.kill(handle, no_restart=True)

    def _tasks(self, ray: ModuleType) -> dict[str, Any]:
        """The placement-group tasks of ``ray_actor``, wrapped once."""
        if self._group_tasks is None:
            from shipyard.compute.executors import ray_actor

            self._group_tasks = {
                "create_group": ray.remote(num_cpus=0)(ray_actor.create_group),
                "remove_group": ray.remote(num_cpus=0)(ray_actor.remove_group),
            }
        return self._group_tasks

    def _actor(self, ray: ModuleType, name: str) -> Any:
        """The handle of actor ``name`` (cached), None when there is none."""
        handle = self._handles.get(name)
        if handle is None:
            handle = self._actor(ray, name)
            if handle is not None:
                self._handles[name] = handle
        return handle

    def _poll_all(
        self, ray: ModuleType, refs: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, list[_Rank]]:
        calls: list[tuple[str, int, Any]] = []
        result: dict[str, list[_Rank]] = {job_id: [] for job_id in refs}
        for job_id, ref in refs.items():
            for rank, name in enumerate(ref.get("actors", [])):
                handle = self._actor(ray, name)
                if handle is None:
                    result[job_id].append(_Rank(rank, None, "its actor is gone"))
                else:
                    calls.append((job_id, rank, handle.poll.remote()))
        if calls:
            # Short: an actor whose process is still starting answers later (it is running).
            ready, _ = ray.wait(
                [c[2] for c in calls], num_returns=len(calls), timeout=POLL_TIMEOUT_S
            )
            ready_set = set(ready)
            for job_id, rank, future in calls:
                if future not in ready_set:
                    result[job_id].append(_Rank(rank, {"state": "unknown"}))
                    continue
                try:
                    result[job_id].append(_Rank(rank, ray.get(future)))
                except Exception as exc:
                    if _is_connection_error(exc):
                        raise
                    result[job_id].append(_Rank(rank, None, _text(exc)))
        for ranks in result.values():
            ranks.sort(key=lambda r: r.rank)
        return result

    def _judge(
        self, ctx: Any, ray: ModuleType, job_id: str, ref: Mapping[str, Any], ranks: list[_Rank]
    ) -> Observation:
        nodes = list(ref.get("nodes", []))
        usage = _sum_usage([r.poll for r in ranks if r.poll])
        lost = [r for r in ranks if r.poll is None]
        if lost:
            first = lost[0]
            node = nodes[first.rank] if first.rank < len(nodes) else None
            self._stop_ranks(ray, ref, "lost", grace_s=0.0)
            return Observation(
                job_id=job_id,
                state="lost",
                usage=usage,
                node_id=node,
                message=self._lost_text(ray, ref, first),
            )
        if not ranks:
            return Observation(
                job_id=job_id, state="lost", message="its executor reference names no workers"
            )
        polls = [r.poll or {} for r in ranks]
        if any(p.get("state") != "exited" for p in polls):
            # A worker that failed by itself ends the gang: stop the others (torchrun's rule).
            failed = [
                p
                for p in polls
                if p.get("state") == "exited" and p.get("exit_code") and not p.get("stop_reason")
            ]
            if failed:
                self._stop_ranks(ray, ref, "gang", grace_s=GANG_GRACE_S)
            return Observation(job_id=job_id, state="running", usage=usage)
        # Every worker has exited: the outcome.
        self._pull_logs(ctx, ray, job_id, ref, final=True)
        status, message, exit_code, preempted = _outcome(ctx, job_id, ref, polls)
        stored = polls[0].get("outputs")  # rank 0 stores the declared outputs
        return Observation(
            job_id=job_id,
            state="finished",
            status=status,
            exit_code=exit_code,
            usage=usage,
            message=message,
            preempted=preempted,
            outputs=None if preempted or stored is None else [str(p) for p in stored],
        )

    def _lost_text(self, ray: ModuleType, ref: Mapping[str, Any], first: _Rank) -> str:
        nodes = list(ref.get("nodes", []))
        node = nodes[first.rank] if first.rank < len(nodes) else "?"
        address, state = "?", ""
        with contextlib.suppress(Exception):
            for entry in ray.nodes():
                if entry.get("NodeID") == node:
                    address = str(entry.get("NodeManagerAddress") or "?")
                    state = "" if entry.get("Alive") else "; the node is dead"
        return (
            f"worker rank {first.rank} was lost with its Ray node {node} ({address}){state}: "
            f"{first.error}"
        )

    def _stop_ranks(
        self, ray: ModuleType, ref: Mapping[str, Any], reason: str, *, grace_s: float
    ) -> None:
        for name in ref.get("actors", []):
            handle = self._actor(ray, name)
            if handle is not None:
                handle.stop.remote(reason, grace_s)

    def _close_job(
        self,
        ctx: Any,
        ray: ModuleType,
        job_id: str,
        ref: Mapping[str, Any],
        observation: Observation,
    ) -> None:
        """Logs copied (done by the caller), result kept, actors killed, placement group gone."""
        _write_result(ctx, job_id, ref, observation)
        names = list(ref.get("actors", []))
        handles = [h for h in (self._actor(ray, name) for name in names) if h is not None]
        with contextlib.suppress(Exception):
            ray.wait([h.cleanup.remote() for h in handles], num_returns=len(handles), timeout=5.0)
        self._kill(ray, names)
        name = ref.get("placement_group_name")
        if name:  # not waited for: the next look finds the result file first
            self._tasks(ray)["remove_group"].remote(str(name))

    def _pull_logs(
        self,
        ctx: Any,
        ray: ModuleType,
        job_id: str,
        ref: Mapping[str, Any],
        *,
        final: bool,
        sizes: Mapping[int, int] | None = None,
    ) -> None:
        """Append what the actors logged since the last pull to the server's job log: whole
        lines only while the job runs (``final`` takes the rest). Safe across processes."""
        path = records.log_path(ctx, job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        attempt = int(ref.get("attempt", 1))
        state_path = path.with_name(f"{path.name}.ray-{attempt}.json")
        with _file_lock(path.with_name(f"{path.name}.lock")):
            try:
                offsets = {int(k): int(v) for k, v in json.loads(state_path.read_text()).items()}
            except (OSError, ValueError):
                offsets = {}
            if sizes is not None and all(n <= offsets.get(r, 0) for r, n in sizes.items()):
                return  # the workers' logs (as their polls just said) hold nothing new
            names = list(ref.get("actors", []))
            handles = [self._actor(ray, name) for name in names]
            calls = [
                (rank, h.read_log.remote(offsets.get(rank, 0), LOG_CHUNK))
                for rank, h in enumerate(handles)
                if h is not None
            ]
            if not calls:
                return
            ready, _ = ray.wait(
                [c[1] for c in calls],
                num_returns=len(calls),
                timeout=CALL_TIMEOUT_S if final else POLL_TIMEOUT_S,
            )
            chunks: list[bytes] = []
            for rank, future in calls:
                if future not in ready:
                    continue
                try:
                    data, _size = ray.get(future)
                except Exception as exc:
                    if _is_connection_error(exc):
                        raise
                    continue
                if not final:
                    data = data[: data.rfind(b"\n") + 1]
                elif data and not data.endswith(b"\n"):
                    offsets[rank] = offsets.get(rank, 0) + len(data)
                    chunks.append(data + b"\n")
                    continue
                if data:
                    offsets[rank] = offsets.get(rank, 0) + len(data)
                    chunks.append(data)
            if chunks:
                with open(path, "ab") as fh:
                    fh.write(b"".join(chunks))
                state_path.write_text(json.dumps(offsets))
        if final and any(len(c) == LOG_CHUNK for c in chunks):
            self._pull_logs(ctx, ray, job_id, ref, final=True)  # more than one chunk was left


def disconnect() -> None:
    """Close this process's Ray Client connection, if any (tests; a server's shutdown)."""
    global _connected_address
    with _connection_lock:
        if _connected_address is None:
            return
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        _connected_address = None


# --- module helpers ------------------------------------------------------------------------------


def parse_url(url: str) -> tuple[str, int]:
    """``ray://HOST:PORT`` -> (host, port); InvalidInputError (field ``executor``) otherwise."""
    if not url.startswith(SCHEME):
        raise InvalidInputError(
            f"executor {url!r} is not a Ray address; write ray://HOST:PORT (the head node's Ray "
            "Client port, 10001 by default)",
            field="executor",
        )
    rest = url[len(SCHEME) :].rstrip("/")
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        host, port_text = rest, "10001"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not host or not 0 < port < 65536:
        raise InvalidInputError(
            f"executor {url!r} is not a Ray address; write ray://HOST:PORT with a port in "
            "1..65535 (the head node's Ray Client port, 10001 by default)",
            field="executor",
        )
    return host.strip("[]"), port


def _node_info(entry: Mapping[str, Any]) -> NodeInfo:
    resources: Mapping[str, float] = entry.get("Resources") or {}
    labels: dict[str, str] = {str(k): str(v) for k, v in (entry.get("Labels") or {}).items()}
    model = labels.get(MODEL_LABEL, "")
    if not model:
        for key in resources:
            if key.startswith(ACCELERATOR_PREFIX):
                model = key[len(ACCELERATOR_PREFIX) :]
                break
    try:
        gpu_memory = int(labels.get(GPU_MEMORY_LABEL, "0"))
    except ValueError:
        gpu_memory = 0
    count = int(resources.get("GPU", 0))
    gpus = tuple(
        Gpu(index=i, model=model or "declared", memory_mb=gpu_memory) for i in range(count)
    )
    alive = bool(entry.get("Alive"))
    node_id = str(entry.get("NodeID", ""))
    return NodeInfo(
        node=Node(
            id=node_id,
            cpus=float(resources.get("CPU", 0.0)),
            memory_mb=int(resources.get("memory", 0) // MB),
            gpus=gpus,
            healthy=alive,
        ),
        hostname=str(entry.get("NodeManagerHostname", "")),
        address=str(entry.get("NodeManagerAddress", "")),
        gpu_source="declared" if count else "none",
        labels=labels,
        message="" if alive else "the Ray node is dead",
    )


def _model_selector(ray: ModuleType, gpu_type: str) -> dict[str, str] | None:
    """The bundles' label selector for a job asking for ``gpu_type``: the live nodes whose GPUs
    are that model (by Ray's ``accelerator_type:`` resource or the model label, as ``nodes``
    reads them), by their ``ray.io/node-id`` label; None when no node has one (admission keeps
    such a job waiting before it gets here).

    Not the ``accelerator_type:X`` resource in the bundle, Ray's own convention: Ray 2.60's raylet
    on a node added after a second Ray Client connection crashed ("Check failed:
    IsCPUOrPlacementGroupCPUResource ... accelerator_type:T4_group_0_... has less availability
    than requested") when two placement groups reserved that resource - the node and its jobs
    lost, and a restarted shipyard server makes exactly such a second connection."""
    ids = sorted(
        info.node.id
        for info in (_node_info(entry) for entry in ray.nodes())
        if info.node.healthy
        and info.node.id
        and any(gpu_matches(gpu.model, gpu_type) for gpu in info.node.gpus)
    )
    return {NODE_ID_LABEL: f"in({','.join(ids)})"} if ids else None


def _actor(ray: ModuleType, name: str) -> Any:
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


def _outcome(
    ctx: Any, job_id: str, ref: Mapping[str, Any], polls: list[dict[str, Any]]
) -> tuple[JobStatus | None, str, int | None, bool]:
    """(status, message, exit code, preempted) of a job whose workers have all exited."""
    reasons = {p.get("stop_reason") for p in polls} - {None, "gang"}
    code0 = polls[0].get("exit_code")
    many = len(polls) > 1
    if "preempt" in reasons:
        attempt = int(ref.get("attempt", 1))
        reason, cancelled = _preemption_reason(ctx, job_id)
        _note(
            ctx,
            job_id,
            f"shipyard: attempt {attempt} stopped: cancelled while preempted"
            if cancelled
            else f"shipyard: attempt {attempt} preempted: {reason}; requeued",
        )
        return None, f"preempted: {reason}", code0, True
    if "cancel" in reasons:
        return JobStatus.CANCELLED, "cancelled while running", code0, False
    if "timeout" in reasons:
        limit = ref.get("max_runtime_s")
        text = f" of {float(limit):g}s" if limit else ""
        return JobStatus.TIMED_OUT, f"ran past its max runtime{text}; stopped", code0, False
    if "lost" in reasons:
        return JobStatus.FAILED, "stopped: one of its workers was lost", code0, False
    # The worker that failed first by itself (the others were stopped for it: "gang").
    failures = sorted(
        (float(p.get("exited_at") or 0.0), p.get("stop_reason") is not None, rank)
        for rank, p in enumerate(polls)
        if p.get("exit_code")
    )
    if not failures:
        text = f"all {_workers(len(polls))} exited with code 0" if many else "exited with code 0"
        return JobStatus.SUCCEEDED, text, 0, False
    own = [f for f in failures if not f[1]] or failures
    rank = own[0][2]
    code = int(polls[rank]["exit_code"])
    said = str(polls[rank].get("message") or "")
    if code == 127 and said.startswith("could not"):  # the command could not start
        return JobStatus.FAILED, said, code, False
    head = f"rank {rank} {describe_exit(code)}" if many else describe_exit(code)
    if many:
        head += f"; stopped the other {_workers(len(polls) - 1)}"
    tail = _log_tail(records.log_path(ctx, job_id))
    message = f"{head}; last lines of the log:\n{tail}" if tail else f"{head}; the log is empty"
    return JobStatus.FAILED, message, code, False


def _outputs_target(launch: Launch) -> dict[str, Any] | None:
    """What rank 0's actor needs to upload the job's declared outputs (None: none declared)."""
    declared = list(getattr(launch.spec, "outputs", None) or [])
    if not declared:
        return None
    return {
        "declared": declared,
        "server_url": launch.server_url,
        "token": launch.token,
        "project": launch.project,
        "run_id": launch.run_id,
    }


def _note(ctx: Any, job_id: str, line: str) -> None:
    """Append one "shipyard: ..." line to the job's log (between the pulls of the ranks' lines)."""
    path = records.log_path(ctx, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(f"{path.name}.lock")), open(path, "ab") as fh:
        fh.write(line.rstrip("\n").encode() + b"\n")


def _preemption_reason(ctx: Any, job_id: str) -> tuple[str, bool]:
    """Why the job is being preempted (the pipeline's "preempting: ..." message), and whether a
    cancel came meanwhile - read, never written: the pipeline records the outcome."""
    from shipyard.store.tables import JobRow

    with ctx.db.read() as s:
        row = s.get(JobRow, job_id)
        if row is None:
            return "preempted", False
        reason = (row.message or "").removeprefix("preempting: ") or "preempted"
        return reason, bool(row.cancel_requested)


def _group_name(job_id: str, attempt: int) -> str:
    return f"shipyard-{job_id}-{attempt}"


def _actor_name(job_id: str, attempt: int, rank: int) -> str:
    return f"job-{job_id}-{attempt}-{rank}"


def _no_proxy_for_loopback(host: str) -> None:
    """Ray Client is gRPC, and gRPC sends even a loopback connection through ``grpc_proxy`` /
    ``https_proxy`` / ``http_proxy`` unless ``no_grpc_proxy`` (or ``no_proxy``) names the host: a
    proxy cannot reach this machine's loopback, so the connection would just time out."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return
    if not any(os.environ.get(k) for k in ("grpc_proxy", "https_proxy", "http_proxy")):
        return
    # gRPC reads these names in lower case
    current = os.environ.get("no_grpc_proxy") or os.environ.get("no_proxy") or ""  # noqa: SIM112
    names = [n.strip() for n in current.split(",") if n.strip()]
    if host not in names:
        os.environ["no_grpc_proxy"] = ",".join([*names, host])  # noqa: SIM112


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionError):
        return True
    return type(exc).__module__.startswith("grpc")


def _sum_usage(polls: list[dict[str, Any]]) -> JobUsage | None:
    usages: list[dict[str, float]] = [p["usage"] for p in polls if p.get("usage")]
    if not usages:
        return None
    return JobUsage(
        cpu_seconds=round(sum(u["cpu_seconds"] for u in usages), 3),
        peak_memory_mb=round(sum(u["peak_memory_mb"] for u in usages), 3),
        wall_seconds=round(max(u["wall_seconds"] for u in usages), 3),
    )


def _result_path(ctx: Any, job_id: str, ref: Mapping[str, Any]) -> Path:
    path = records.log_path(ctx, job_id)
    return path.with_name(f"ray-result-{int(ref.get('attempt', 1))}.json")


def _read_result(ctx: Any, job_id: str, ref: Mapping[str, Any] | None) -> Observation | None:
    """The outcome of this attempt when a process already closed it (observe is idempotent)."""
    if not ref:
        return None
    try:
        data = json.loads(_result_path(ctx, job_id, ref).read_text())
    except (OSError, ValueError):
        return None
    usage = data.pop("usage", None)
    status = data.pop("status", None)
    return Observation(
        **data,
        usage=JobUsage(**usage) if usage else None,
        status=JobStatus(status) if status else None,
    )


def _write_result(ctx: Any, job_id: str, ref: Mapping[str, Any], observation: Observation) -> None:
    data = asdict(observation)
    data["status"] = observation.status.value if observation.status else None
    data["usage"] = observation.usage.model_dump() if observation.usage else None
    path = _result_path(ctx, job_id, ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_file(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, offset))
            return fh.read(max(0, limit)), size
    except FileNotFoundError:
        return b"", 0


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - LOG_TAIL_BYTES))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _bundle_text(bundle: Mapping[str, float]) -> str:
    parts = [f"{bundle['CPU']:g} CPUs", f"{int(bundle['memory'] // MB)} MB"]
    if bundle.get("GPU"):
        parts.append(f"{bundle['GPU']:g} GPUs")
    return ", ".join(parts)


def _workers(count: int) -> str:
    return f"{count} worker" if count == 1 else f"{count} workers"


def _text(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["NAMESPACE", "RayExecutor", "disconnect", "parse_url"]
