"""Workers of a job: layout, torchrun's environment, the prefixed log and the gang, on real
processes (small ``python -c`` workers)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from shipyard.compute.policy.base import Placement, WorkerPlacement
from shipyard.compute.workers import (
    MAX_LINE_BYTES,
    Gang,
    PrefixedLog,
    WorkerSlot,
    free_port,
    gang_layout,
    rank_env,
)
from tests.conftest import wait_for

PY = sys.executable

TORCHRUN_VARIABLES = {
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_NAME",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE",
}


def placement(*nodes: str) -> Placement:
    return Placement(
        job_id="j1",
        workers=tuple(
            WorkerPlacement(node_id=node, gpus=(index,)) for index, node in enumerate(nodes)
        ),
    )


def gang_of(
    tmp_path: Path, codes: list[str], *, prefix: bool = True, grace_s: float = 5.0
) -> tuple[Gang, PrefixedLog]:
    log = PrefixedLog(tmp_path / "output.log", prefix=prefix)
    slots = gang_layout(placement(*["local"] * len(codes)))
    port = free_port()
    envs = [
        {
            **os.environ,
            **rank_env(
                slot, world_size=len(codes), master_addr="127.0.0.1", master_port=port, job_id="j1"
            ),
        }
        for slot in slots
    ]
    gang = Gang(
        commands=[[PY, "-c", code] for code in codes],
        envs=envs,
        cwd=tmp_path,
        log=log,
        ranks=[slot.rank for slot in slots],
        grace_s=grace_s,
    )
    return gang, log


def finish(gang: Gang, log: PrefixedLog, timeout: float = 30.0) -> str:
    result = wait_for(gang.poll, timeout=timeout, what="the gang to end")
    assert result is not None
    log.close()
    return log.path.read_bytes().decode("utf-8", errors="replace")


def gone(pid: int) -> bool:
    """Our child ``pid`` has exited AND been reaped (not even a zombie is left)."""
    try:
        psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    return False


# --- layout and environment --------------------------------------------------------------------


def test_layout_numbers_nodes_in_order_of_first_appearance() -> None:
    slots = gang_layout(placement("a", "a", "b", "a", "b"))
    assert [(s.rank, s.node_rank, s.local_rank, s.local_world_size) for s in slots] == [
        (0, 0, 0, 3),
        (1, 0, 1, 3),
        (2, 1, 0, 2),
        (3, 0, 2, 3),
        (4, 1, 1, 2),
    ]
    assert {s.node_count for s in slots} == {2}
    assert slots[2].gpus == (2,) and slots[2].node_id == "b"


def test_rank_env_is_torchruns_set() -> None:
    slot = gang_layout(placement("a", "a", "b", "b"))[3]
    env = rank_env(
        slot, world_size=4, master_addr="10.0.0.1", master_port=29500, job_id="job7", inherited={}
    )
    assert set(env) == TORCHRUN_VARIABLES | {"OMP_NUM_THREADS"}
    assert env["RANK"] == "3" and env["LOCAL_RANK"] == "1" and env["GROUP_RANK"] == "1"
    assert env["WORLD_SIZE"] == "4" and env["LOCAL_WORLD_SIZE"] == "2"
    assert env["GROUP_WORLD_SIZE"] == "2" and env["ROLE_WORLD_SIZE"] == "4"
    assert env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "29500"
    assert env["TORCHELASTIC_RUN_ID"] == "job7"
    assert env["TORCHELASTIC_USE_AGENT_STORE"] == "False"
    assert env["OMP_NUM_THREADS"] == "1"


def test_rank_env_of_a_single_worker_and_an_inherited_thread_count() -> None:
    (slot,) = gang_layout(placement("a"))
    env = rank_env(
        slot, world_size=1, master_addr="127.0.0.1", master_port=1234, job_id="j", inherited={}
    )
    assert set(env) == TORCHRUN_VARIABLES  # one worker: OMP_NUM_THREADS is left alone
    assert env["RANK"] == env["LOCAL_RANK"] == env["GROUP_RANK"] == "0"
    two = gang_layout(placement("a", "a"))[0]
    kept = rank_env(
        two,
        world_size=2,
        master_addr="127.0.0.1",
        master_port=1234,
        job_id="j",
        inherited={"OMP_NUM_THREADS": "4"},
    )
    assert "OMP_NUM_THREADS" not in kept


@pytest.mark.parametrize(
    ("rank", "world", "port"), [(2, 2, 1234), (0, 0, 1234), (0, 1, 0), (0, 1, 70000)]
)
def test_rank_env_refuses_impossible_values(rank: int, world: int, port: int) -> None:
    slot = WorkerSlot(rank=rank, local_rank=0, node_rank=0, local_world_size=1, node_id="a")
    with pytest.raises(ValueError):
        rank_env(slot, world_size=world, master_addr="h", master_port=port, job_id="j")


def test_free_port_can_be_bound() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --- the prefixed log --------------------------------------------------------------------------


def test_workers_see_their_rank_env_and_every_line_is_prefixed(tmp_path: Path) -> None:
    code = (
        "import json, os, sys\n"
        "keys = ['RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT']\n"
        "print(json.dumps({k: os.environ[k] for k in keys}))\n"
        "print('to stderr', file=sys.stderr)\n"
        "sys.stdout.write('no newline at the end')\n"
    )
    gang, log = gang_of(tmp_path, [code, code])
    gang.start()
    text = finish(gang, log)
    lines = text.splitlines()
    assert len(lines) == 6
    for rank in (0, 1):
        mine = [
            line.removeprefix(f"[rank {rank}] ")
            for line in lines
            if line.startswith(f"[rank {rank}] ")
        ]
        assert len(mine) == 3, text
        seen = json.loads(next(line for line in mine if line.startswith("{")))
        assert seen["RANK"] == seen["LOCAL_RANK"] == str(rank)
        assert seen["WORLD_SIZE"] == "2"
        assert "to stderr" in mine and "no newline at the end" in mine
    assert text.endswith("\n")


def test_log_is_binary_safe_and_cuts_long_lines(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.stdout.buffer.write(b'\\xff\\xfe bytes\\n')\n"
        f"sys.stdout.buffer.write(b'x' * {MAX_LINE_BYTES * 2 + 10} + b'\\n')\n"
    )
    gang, log = gang_of(tmp_path, [code])
    gang.start()
    finish(gang, log)
    data = log.path.read_bytes()
    lines = data.split(b"\n")[:-1]
    assert lines[0] == b"[rank 0] \xff\xfe bytes"
    assert [len(line) for line in lines[1:]] == [
        len(b"[rank 0] ") + MAX_LINE_BYTES,
        len(b"[rank 0] ") + MAX_LINE_BYTES,
        len(b"[rank 0] ") + 10,
    ]


def test_a_long_line_completed_in_a_later_read_is_cut_too(tmp_path: Path) -> None:
    # The first read ends MAX-2 bytes into the long line; the second completes it (MAX+5 bytes
    # in all): a complete line is cut as well, not only a pending one.
    source = tmp_path / "source"
    source.write_bytes(b"a\n" + b"x" * (MAX_LINE_BYTES + 5) + b"\nend\n")
    log = PrefixedLog(tmp_path / "output.log", prefix=True)
    log.attach(3, open(source, "rb"))  # noqa: SIM115 - the log's thread closes it
    log.close()
    lines = (tmp_path / "output.log").read_bytes().split(b"\n")[:-1]
    assert [len(line) - len(b"[rank 3] ") for line in lines] == [1, MAX_LINE_BYTES, 5, 3]
    assert all(line.startswith(b"[rank 3] ") for line in lines)


def test_unprefixed_log_copies_bytes_as_they_are(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('a\\nb'); sys.stdout.flush()"
    gang, log = gang_of(tmp_path, [code], prefix=False)
    gang.start()
    result = wait_for(gang.poll, what="the worker to end")
    assert result is not None and result.ok
    log.close(timeout=10)
    assert log.path.read_text() == "a\nb"


def test_write_line_starts_on_a_new_line(tmp_path: Path) -> None:
    code = "import sys; sys.stdout.write('partial'); sys.stdout.flush()"
    log = PrefixedLog(tmp_path / "output.log", prefix=False)
    gang = Gang(
        commands=[[PY, "-c", code]], envs=[dict(os.environ)], cwd=tmp_path, log=log, ranks=[0]
    )
    gang.start()
    wait_for(gang.poll, what="the worker to end")
    log.close()
    assert log.path.read_text() == "partial"
    again = PrefixedLog(tmp_path / "other.log", prefix=False)
    again.write_line("shipyard: hello")
    again.close()
    with pytest.raises(ValueError, match="closed"):
        again.write_line("late")
    assert (tmp_path / "other.log").read_text() == "shipyard: hello\n"


# --- the gang ------------------------------------------------------------------------------------


def test_all_workers_exit_zero(tmp_path: Path) -> None:
    gang, log = gang_of(tmp_path, ["print('hi')"] * 3)
    gang.start()
    result = wait_for(gang.poll, what="the gang to end")
    log.close()
    assert result.ok and result.exit_code == 0 and result.failed_rank is None
    assert "all 3 workers exited with code 0" in result.message


def test_one_worker_dying_stops_the_gang_and_names_its_rank(tmp_path: Path) -> None:
    sleeper = "import time\nprint('waiting', flush=True)\nwhile True: time.sleep(0.05)"
    # rank 1 waits until the others are up (their first line is in the log), then fails.
    dier = (
        "import sys, time, pathlib\n"
        f"log = pathlib.Path({str(tmp_path / 'output.log')!r})\n"
        "while log.read_text().count('waiting') < 2: time.sleep(0.02)\n"
        "sys.exit(3)\n"
    )
    gang, log = gang_of(tmp_path, [sleeper, dier, sleeper])
    gang.start()
    pids = gang.pids()
    result = wait_for(gang.poll, what="the gang to fail")
    log.close()
    assert not result.ok
    assert result.failed_rank == 1 and result.exit_code == 3
    assert result.message == "rank 1 exited with code 3; stopped the other 2 workers"
    assert all(gone(pid) for pid in pids)
    assert gang.poll() == result  # the result stays


def test_a_worker_killed_by_a_signal_is_named(tmp_path: Path) -> None:
    gang, log = gang_of(tmp_path, ["import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    gang.start()
    result = wait_for(gang.poll, what="the worker to die")
    log.close()
    assert result.failed_rank == 0 and result.exit_code == -signal.SIGKILL
    assert result.message == "rank 0 was killed by SIGKILL"


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\nwhile True: time.sleep(0.05)"
    )
    gang, log = gang_of(tmp_path, [stubborn, "raise SystemExit(1)"], grace_s=0.5)
    gang.start()
    result = wait_for(gang.poll, what="the gang to fail")
    log.close()
    assert result.failed_rank == 1 and result.exit_code == 1
    assert all(gone(pid) for pid in gang.pids())


def test_stop_kills_every_group_and_leaves_no_zombie(tmp_path: Path) -> None:
    # Each worker starts a grandchild in its group; stop() must end those too.
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('child', child.pid, flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    gang, log = gang_of(tmp_path, [code, code])
    gang.start()
    path = tmp_path / "output.log"
    wait_for(lambda: path.read_text().count("child ") == 2, what="both grandchildren")
    grandchildren = [int(line.split()[-1]) for line in path.read_text().splitlines()]
    assert gang.poll() is None
    gang.stop(grace_s=5.0)
    result = gang.poll()
    log.close()
    assert result is not None and not result.ok and result.failed_rank is None
    assert result.message == "the 2 workers were stopped"
    assert all(gone(pid) for pid in gang.pids())  # reaped: no zombie of ours is left
    # The grandchildren were re-parented (to init or a subreaper): gone or at most zombies.
    for pid in grandchildren:
        wait_for(lambda pid=pid: _dead(pid), what=f"grandchild {pid} to die")


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_command_that_cannot_start_stops_the_started_ones(tmp_path: Path) -> None:
    log = PrefixedLog(tmp_path / "output.log", prefix=True)
    gang = Gang(
        commands=[[PY, "-c", "import time; time.sleep(600)"], [str(tmp_path / "missing")]],
        envs=[dict(os.environ)] * 2,
        cwd=tmp_path,
        log=log,
        ranks=[0, 1],
    )
    with pytest.raises(OSError, match="could not start rank 1"):
        gang.start()
    log.close()
    assert all(gone(pid) for pid in gang.pids())


def test_bad_gang_shapes_are_refused(tmp_path: Path) -> None:
    log = PrefixedLog(tmp_path / "output.log", prefix=True)
    with pytest.raises(ValueError, match="one command, env and rank per worker"):
        Gang(commands=[["true"]], envs=[], cwd=tmp_path, log=log, ranks=[0])
    with pytest.raises(ValueError, match="one command"):
        Gang(commands=[], envs=[], cwd=tmp_path, log=log, ranks=[])
    gang = Gang(commands=[["true"]], envs=[dict(os.environ)], cwd=tmp_path, log=log, ranks=[0])
    with pytest.raises(RuntimeError, match="not started"):
        gang.poll()
    log.close()


# --- through the local executor ------------------------------------------------------------------

DIER = """\
import os, pathlib, sys, time
rank = os.environ["RANK"]
if rank == "0":
    pathlib.Path("rank0.pid").write_text(str(os.getpid()))
    print("rank 0 is up", flush=True)
    while True:
        time.sleep(0.05)
while not pathlib.Path("rank0.pid").exists():
    time.sleep(0.02)
print("rank 1 gives up", flush=True)
sys.exit(3)
"""


@pytest.mark.slow
def test_a_gang_job_whose_worker_dies_fails_naming_the_rank(tmp_path: Path, home: Path) -> None:
    """A job of 2 workers on the local executor (``shipyard run --workers 2``, here through the
    SDK): rank 1 exits 3 while rank 0 runs on; the whole job fails with rank 1 named, rank 0 is
    stopped, and both ranks' lines are in the job's log."""
    from shipyard.client.client import Client
    from shipyard.domain.models import JobSpec
    from shipyard.settings import Settings

    code = tmp_path / "code"
    code.mkdir()
    (code / "die.py").write_text(DIER)
    client = Client(settings=Settings(home=home))
    spec = JobSpec(command=[PY, "die.py"], workers=2)
    job = client.backend.submit_job(project="p", spec=spec, code_dir=code)
    done = wait_for(
        lambda: (j := client.jobs.get(job.id, project="p")).status.finished and j,
        timeout=60,
        what="the gang job to end",
    )
    text, _, _ = client.jobs.logs(job.id, project="p")
    assert done.status.value == "failed", f"{done.message}\n{text}"
    assert "rank 1 exited with code 3" in done.message, done.message
    assert done.exit_code == 3
    assert "[rank 0] rank 0 is up" in text and "[rank 1] rank 1 gives up" in text, text
    pid = int((home / "jobs" / job.id / "code" / "rank0.pid").read_text())
    wait_for(lambda: _dead(pid), what="rank 0 to be stopped")
