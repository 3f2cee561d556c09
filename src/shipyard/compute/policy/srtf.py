"""Oracle shortest-remaining-time-first, preemptive: the bound a real policy is measured against.

It reads ``duration_s``, the true duration that only the simulator knows (the admission pipeline
never has it; a job without one falls back to its ``max_runtime_s``, else comes last). Remaining
time = ``duration_s - attained_gpu_s / GPUs`` (GPUs = workers x GPUs per worker). Shortest first
(higher priority before any), FIFO on ties; a pending job that does not fit preempts running jobs
with a strictly longer remaining time (the engine and its rules are ``las.PreemptivePriority``'s).
"""

from __future__ import annotations

import math

from shipyard.compute.policy.base import PendingJob, RunningJob
from shipyard.compute.policy.las import PreemptivePriority


class Srtf(PreemptivePriority):
    name = "srtf"

    def key(self, job: PendingJob | RunningJob) -> float:
        total = job.duration_s if job.duration_s is not None else job.max_runtime_s
        if total is None:
            return math.inf
        gpus = job.demand.gpu_units * job.workers
        done = job.attained_gpu_s / gpus if gpus > 0 else 0.0
        return max(0.0, total - done)

    def describe(self, job: PendingJob) -> str:
        remaining = self.key(job)
        return (
            "SRTF, no known duration" if remaining == math.inf else f"SRTF, {remaining:.0f}s left"
        )


__all__ = ["Srtf"]
