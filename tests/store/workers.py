"""Worker processes for the store's concurrency tests (run as scripts, one per process).

Each worker opens the database, prints ``ready`` and waits for a line on stdin, so that the test
can release all of them at once; then it writes in many short transactions and prints ``done``.

    python workers.py audit URL WORKER COUNT   # COUNT audit events, one transaction each
    python workers.py tally URL WORKER COUNT   # COUNT read-modify-writes, each under a new lock
    python workers.py open URL WORKER 0        # only open (and so migrate) the database
"""

from __future__ import annotations

import sys

from shipyard.security import audit
from shipyard.store import open_database
from shipyard.store.engine import lock
from shipyard.store.tables import LockRow

TALLY_LOCK = "test-tally"  # + "-N": not seeded by the migrations, so the first use creates it
TALLY_ROW = "test-tally-value"  # + "-N": the counter that lock N guards


def main(mode: str, url: str, worker: str, count: int) -> None:
    if mode != "open":
        open_database(url)
    print("ready", flush=True)
    sys.stdin.readline()
    db = open_database(url)
    for n in range(count):
        with db.transaction() as s:
            if mode == "audit":
                audit.record(
                    s,
                    actor=f"worker-{worker}",
                    action="test.write",
                    resource=f"test/{worker}/{n}",
                    details={"worker": worker, "n": n},
                )
            elif mode == "tally":
                # a lock name nobody used before, every time: all workers race to create its row
                lock(s, f"{TALLY_LOCK}-{n}")
                row = s.get(LockRow, f"{TALLY_ROW}-{n}")
                if row is None:
                    s.add(LockRow(name=f"{TALLY_ROW}-{n}", holder="", acquired_at=1.0))
                else:
                    row.acquired_at += 1.0
    print("done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
