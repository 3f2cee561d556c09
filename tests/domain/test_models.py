"""domain.models: immutable, strict models (an unknown field is an error, not dropped)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shipyard.domain.models import FileEntry, JobSpec, Resources


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError) as caught:
        FileEntry(path="a", digest="0" * 64, size=1, sneaky=True)  # type: ignore[call-arg]
    assert caught.value.errors()[0]["loc"] == ("sneaky",)


def test_models_are_frozen() -> None:
    entry = FileEntry(path="a", digest="0" * 64, size=1)
    with pytest.raises(ValidationError):
        entry.size = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        ({"command": []}, ("command",)),
        ({"command": ["x"], "priority": 1001}, ("priority",)),
        ({"command": ["x"], "max_runtime_s": 0}, ("max_runtime_s",)),
        ({"command": ["x"], "resources": {"cpus": 0}}, ("resources", "cpus")),
        ({"command": ["x"], "resources": {"gpus": -1}}, ("resources", "gpus")),
    ],
)
def test_job_spec_bounds_name_the_field(kwargs: dict[str, object], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(kwargs)
    assert caught.value.errors()[0]["loc"] == loc


def test_job_spec_defaults() -> None:
    spec = JobSpec(command=["python", "train.py"])
    assert spec.resources == Resources(cpus=1.0, memory_mb=512, gpus=0) and spec.priority == 0
