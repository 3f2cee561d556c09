"""Admission policies (pure; see ``base``). ``get_policy(name)`` builds one by name.

The admission pipeline uses ``default``; the simulator (``shipyard sim``) can replay a trace through
any of them. Each entry is ``name -> "module:Class"`` inside this package, imported on first use.
"""

from __future__ import annotations

import importlib

from shipyard.compute.policy.base import Policy

POLICIES: dict[str, str] = {
    "fifo": "fifo:Fifo",  # strict FIFO by priority then age, head-of-line blocking (the floor)
    "fifo-backfill": "fifo:FifoBackfill",  # FIFO with EASY backfill on max-runtime estimates
    "drf": "drf:Drf",  # dominant-resource fairness across queues, FIFO within
    "las": "las:Las",  # Tiresias-style discretised least-attained-service, preemptive
    "srtf": "srtf:Srtf",  # oracle shortest-remaining-time-first, preemptive (the bound)
    "default": "default:DefaultPolicy",  # shipyard's: quotas, cohorts, DRF, priorities, LAS,
    # EASY backfill, gangs, preemption
}


def get_policy(name: str = "default") -> Policy:
    try:
        target = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; use one of {', '.join(POLICIES)}") from None
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    policy: Policy = getattr(module, attr)()
    return policy


__all__ = ["POLICIES", "get_policy"]
