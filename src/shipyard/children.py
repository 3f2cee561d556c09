"""Detached child processes this process started: job supervisors and serving replicas.

They run in their own sessions and outlive us by design, but while we live they are our children:
we keep their ``Popen`` handles so exited ones are reaped (no zombies in a long-running server)
and so ``waitpid`` - not a pid lookup that a reused pid could fool - says whether one still runs.
At exit the handles are released, so ``Popen`` does not warn about children still running; init
reparents and reaps them.
"""

from __future__ import annotations

import atexit
import subprocess
import threading
import weakref


class Children:
    """A thread-safe registry of ``Popen`` handles, by pid."""

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()
        _registries.add(self)

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self._procs[proc.pid] = proc

    def get(self, pid: int) -> subprocess.Popen[bytes] | None:
        with self._lock:
            return self._procs.get(pid)

    def poll(self, pid: int) -> int | None:
        """The child's exit status once it has exited (then it is reaped and forgotten, as its pid
        may be reused); None while it runs or when it is not ours."""
        proc = self.get(pid)
        if proc is None:
            return None
        code = proc.poll()
        if code is not None:
            with self._lock:
                self._procs.pop(pid, None)
        return code

    def reap_exited(self) -> None:
        with self._lock:
            pids = list(self._procs)
        for pid in pids:
            self.poll(pid)

    def release(self) -> None:
        """Forget every handle without waiting: the children are no longer ours to wait for."""
        with self._lock:
            for proc in self._procs.values():
                if proc.poll() is None:
                    proc.returncode = 0  # silences Popen's "still running" warning
            self._procs.clear()


_registries: weakref.WeakSet[Children] = weakref.WeakSet()


@atexit.register
def _release_all() -> None:
    for registry in list(_registries):
        registry.release()
