"""``shipyard nodes`` and ``shipyard queues`` as a user runs them on the embedded home (against a
server: ``tests/ui/test_cluster_page.py``); bad input is one clear error line naming the field."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from shipyard.cli.main import app, main
from shipyard.errors import InvalidInputError, NotFoundError

GPU_ENV = {"SHIPYARD_GPUS": "2", "SHIPYARD_GPU_MODEL": "A100", "SHIPYARD_GPU_MEMORY_MB": "40960"}


def cli(home: Path, *args: str, **env: str) -> Result:
    environment = {"SHIPYARD_HOME": str(home), "COLUMNS": "200", "SHIPYARD_URL": "", **env}
    return CliRunner().invoke(app, list(args), env=environment)


@pytest.mark.parametrize(
    "args",
    [
        ["nodes"],
        ["nodes", "list"],
        ["nodes", "show"],
        ["queues"],
        ["queues", "list"],
        ["queues", "show"],
        ["queues", "set"],
        ["queues", "delete"],
    ],
    ids=" ".join,
)
def test_every_cluster_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_queues_and_nodes_on_the_embedded_home(home: Path) -> None:
    made = cli(
        home,
        "queues",
        "set",
        "vision",
        "--gpus",
        "8",
        "--memory",
        "64000",
        "--gpu-model",
        "A100=4",
        "--gpu-model",
        "H100=2",
        "--cohort",
        "lab",
        "--borrow-gpus",
        "2",
        "--weight",
        "2",
    )
    assert made.exit_code == 0, made.output
    assert "queue vision set" in made.output and "cohort lab, weight 2" in made.output
    assert "A100 GPUs: 0/4" in made.output and "H100 GPUs: 0/2" in made.output

    listed = cli(home, "queues", "list")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if "vision" in line)
    assert "lab" in row and "0/8" in row and "0/64000" in row and "0/∞" in row  # CPUs unlimited

    shown = cli(home, "queues", "show", "vision")
    assert shown.exit_code == 0 and "waiting: none" in shown.output

    nodes = cli(home, "nodes", "list", **GPU_ENV)
    assert nodes.exit_code == 0, nodes.output
    here = socket.gethostname()
    node_row = next(line for line in nodes.output.splitlines() if here in line)
    assert "yes" in node_row and "0/2 A100" in node_row
    node = cli(home, "nodes", "show", here, **GPU_ENV)
    assert node.exit_code == 0, node.output
    assert "healthy" in node.output and "GPUs from declared" in node.output
    assert [line.split()[1:4] for line in node.output.splitlines() if "A100" in line] == [
        ["0", "│", "A100"],
        ["1", "│", "A100"],
    ]

    deleted = cli(home, "queues", "delete", "vision")
    assert deleted.exit_code == 0 and "queue vision deleted" in deleted.output
    assert "vision" not in cli(home, "queues", "list").output


def test_bad_cluster_input_is_one_error_naming_the_field(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(home, "queues", "set", "vision", "--gpus", "8").exit_code == 0
    cases = [
        (("queues", "set", "vision", "--gpus", "-1"), "nominal.gpus"),
        (("queues", "set", "vision", "--gpu-model", "A100"), "gpu-model"),
        (("queues", "set", "vision", "--gpu-model", "=3"), "gpu-model"),
        (("queues", "set", "vision", "--weight", "0"), "weight"),
        (("queues", "show", "nope"), "name"),
        (("queues", "delete", "nope"), "name"),
        (("nodes", "show", "gpu-box-9"), "node_id"),
    ]
    for args, field in cases:
        result = cli(home, *args)
        assert result.exit_code != 0, (args, result.output)
        error = result.exception
        assert isinstance(error, InvalidInputError | NotFoundError), (args, result.output)
        assert error.field == field, (args, error)
    assert "0/8" in cli(home, "queues", "list").output  # nothing changed

    # the entry point prints one line and exits 1
    monkeypatch.setenv("SHIPYARD_HOME", str(home))
    monkeypatch.delenv("SHIPYARD_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["shipyard", "queues", "set", "vision", "--gpus", "-1"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error [nominal.gpus]: nominal.gpus must be a"), stderr
    assert len(stderr.splitlines()) == 1
