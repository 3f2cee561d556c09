"""The SDK: ``Client`` over the embedded home or a server, and ``init()`` for tracking."""

from shipyard.client.backend import Backend
from shipyard.client.client import (
    Client,
    DatasetsClient,
    DeploymentsClient,
    JobsClient,
    ModelsClient,
    RunsClient,
)
from shipyard.client.http import HttpBackend
from shipyard.client.local import LocalBackend
from shipyard.client.tracking import ActiveRun, init

__all__ = [
    "ActiveRun",
    "Backend",
    "Client",
    "DatasetsClient",
    "DeploymentsClient",
    "HttpBackend",
    "JobsClient",
    "LocalBackend",
    "ModelsClient",
    "RunsClient",
    "init",
]
