"""The CLI as a user runs it: the real ``shipyard`` entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from shipyard.cli.main import app

COMMANDS = [
    [],
    ["server"],
    ["demo"],
    ["data"],
    ["data", "commit"],
    ["data", "list"],
    ["data", "show"],
    ["data", "versions"],
    ["data", "tag"],
    ["data", "rm"],
    ["data", "restore"],
    ["data", "pull"],
    ["data", "transform"],
    ["data", "checkout"],
    ["run"],
    ["jobs"],
    ["jobs", "list"],
    ["jobs", "show"],
    ["jobs", "logs"],
    ["jobs", "cancel"],
    ["runs", "list"],
    ["runs", "show"],
    ["models", "list"],
    ["models", "show"],
    ["models", "alias"],
    ["deploy"],
    ["deployments", "list"],
    ["deployments", "show"],
    ["deployments", "scale"],
    ["deployments", "update"],
    ["deployments", "stop"],
    ["endpoints", "list"],
    ["predict"],
    ["token", "create"],
    ["gc"],
    ["audit"],
    ["audit", "list"],
    ["audit", "verify"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a) or "root")
def test_every_command_has_help(args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and "--help" in result.output


def shipyard(
    home: Path, *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHIPYARD_HOME": str(home), "COLUMNS": "200"}
    env.pop("SHIPYARD_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "shipyard.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_data_commit_list_show(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.table({"a": [1, 2, 3]}), folder / "t.parquet")
    out = shipyard(home, "data", "commit", str(folder), "--dataset", "tiny", "-m", "first")
    assert out.returncode == 0, out.stderr
    assert "dataset tiny v1: 1 files" in out.stdout
    listed = shipyard(home, "data", "list")
    assert "tiny" in listed.stdout and listed.returncode == 0
    shown = shipyard(home, "data", "show", "tiny@1")
    assert "t.parquet" in shown.stdout and "3 rows" in shown.stdout


def test_errors_are_one_clear_line_and_exit_1(home: Path, tmp_path: Path) -> None:
    out = shipyard(home, "data", "show", "nope")
    assert out.returncode == 1
    assert "error [name]:" in out.stderr and "nope" in out.stderr
    assert "Traceback" not in out.stderr
    bad = shipyard(home, "data", "commit", str(tmp_path), "--dataset", "../escape")
    assert bad.returncode == 1 and "not a valid name" in bad.stderr


def test_token_create_shows_secret_once_and_stores_hash(home: Path) -> None:
    out = shipyard(home, "token", "create", "ci")
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip()
    assert secret.startswith("shp_") and len(secret) > 40
    db = (home / "shipyard.db").read_bytes()
    wal = home / "shipyard.db-wal"
    assert secret.encode() not in db + (wal.read_bytes() if wal.exists() else b"")


def test_run_follows_logs_and_reports_status(home: Path, tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "hello.py").write_text(
        "import os\nprint('hello from', os.environ['SHIPYARD_JOB_ID'])\n"
    )
    out = shipyard(home, "run", "--", sys.executable, "hello.py", cwd=code)
    assert out.returncode == 0, out.stderr
    assert "hello from" in out.stdout
    assert "succeeded" in out.stderr
    failing = shipyard(home, "run", "--", sys.executable, "-c", "raise SystemExit(3)", cwd=code)
    assert failing.returncode == 1 and "failed" in failing.stderr
    missing = shipyard(home, "run", "--", "no-such-command-xyz", cwd=code)
    assert missing.returncode == 1 and "no-such-command-xyz" in missing.stderr
    jobs = shipyard(home, "jobs", "list")
    assert jobs.stdout.count("succeeded") == 1 and jobs.stdout.count("failed") == 1


def test_by_id_commands_look_in_one_project(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jobs show|logs|cancel ID` and `runs show ID` find an id only in --project (default
    $SHIPYARD_PROJECT, else 'default'), like the REST API's per-project paths."""
    code = tmp_path / "code"
    code.mkdir()
    submitted = shipyard(
        home, "run", "-p", "p", "-d", "--", sys.executable, "-c", "print('hi')", cwd=code
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    logs = shipyard(home, "jobs", "logs", job_id, "--project", "p", "--follow")
    assert logs.returncode == 0 and "hi" in logs.stdout, logs.stderr
    shown = shipyard(home, "jobs", "show", job_id, "--project", "p")
    assert shown.returncode == 0 and '"project": "p"' in shown.stdout, shown.stderr
    run_id = json_field(shown.stdout, "run_id")
    assert shipyard(home, "runs", "show", run_id, "-p", "p").returncode == 0
    with monkeypatch.context() as env:
        env.setenv("SHIPYARD_PROJECT", "p")
        in_env = shipyard(home, "jobs", "show", job_id)
    assert in_env.returncode == 0, in_env.stderr
    for args in (["jobs", "show", job_id], ["jobs", "cancel", job_id], ["runs", "show", run_id]):
        elsewhere = shipyard(home, *args)  # the default project has no such id
        assert elsewhere.returncode == 1, elsewhere.stdout
        assert "does not exist" in elsewhere.stderr and "Traceback" not in elsewhere.stderr


def json_field(text: str, key: str) -> str:
    import json

    return str(json.loads(text)[key])


def test_models_deploy_predict_and_stop(home: Path, tmp_path: Path) -> None:
    import json

    import numpy as np

    from shipyard.client import Client
    from shipyard.settings import Settings
    from tests.onnx_models import linear_model

    model = linear_model(4, 3, input_name="input", output_name="logits")
    path = tmp_path / "m.onnx"
    path.write_bytes(model.data)
    from shipyard import init

    client = Client(settings=Settings(home=home))
    with init(client=client) as run:
        run.log({"acc": 0.5})
        run.log_model(path, name="lin")
    assert shipyard_ok(home, "models", "alias", "lin", "production", "1")
    shown = shipyard(home, "models", "show", "lin")
    assert "production: (none) -> v1 by local" in shown.stdout

    deployed = shipyard(home, "deploy", "lin@production", "--name", "lin")
    assert deployed.returncode == 0, deployed.stderr
    assert "deployment lin running" in deployed.stdout
    try:
        rows = [[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0]]
        out = shipyard(home, "predict", "lin", "--data", json.dumps(rows))
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
        np.testing.assert_allclose(
            got, np.array(rows, dtype=np.float32) @ model.weights + model.bias, rtol=1e-5
        )
        assert answer["model_version"] == "1" and answer["shipyard"]["model_version"] == "1"
        bad = shipyard(home, "predict", "lin", "--data", "[[1, 2]]")
        assert bad.returncode == 1 and "400" in bad.stderr
        listed = shipyard(home, "deployments", "list")
        assert "lin" in listed.stdout and "running" in listed.stdout
        shown = shipyard(home, "deployments", "show", "lin")
        assert "ready" in shown.stdout and "production=100" in shown.stdout
        old_name = shipyard(home, "endpoints", "list")  # the deprecated alias still answers
        assert old_name.returncode == 0 and "lin" in old_name.stdout
        scaled = shipyard(
            home, "deployments", "update", "lin", "--target-in-flight", "4",
            "--scale-down-delay", "30",
        )  # fmt: skip
        assert scaled.returncode == 0, scaled.stderr
        policy = client.deployments.get("lin").spec.autoscaling
        assert policy is not None and policy.target_in_flight == 4
        assert policy.scale_down_delay_s == 30
        both = shipyard(home, "deployments", "update", "lin", "--no-autoscale",
                        "--target-in-flight", "2")  # fmt: skip
        assert both.returncode == 1 and "--no-autoscale turns autoscaling off" in both.stderr
        assert client.deployments.get("lin").spec.autoscaling == policy  # unchanged
        off = shipyard(home, "deployments", "update", "lin", "--no-autoscale")
        assert off.returncode == 0, off.stderr
        assert client.deployments.get("lin").spec.autoscaling is None
    finally:
        stopped = shipyard(home, "deployments", "stop", "lin")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    again = shipyard(home, "deployments", "stop", "lin")
    assert again.returncode == 1 and "stopped" in again.stderr


def shipyard_ok(home: Path, *args: str) -> bool:
    out = shipyard(home, *args)
    assert out.returncode == 0, out.stderr
    return True


def test_server_refuses_a_public_bind_without_auth(home: Path) -> None:
    out = shipyard(home, "server", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert out.returncode == 2
    assert "refusing to listen on '0.0.0.0' without auth" in out.stderr
    assert "--auth" in out.stderr and "shipyard token create" in out.stderr


def test_data_commit_runs_a_checks_file_and_show_flags_poisoning_signals(
    home: Path, tmp_path: Path
) -> None:
    import numpy as np

    folder = tmp_path / "train"
    folder.mkdir()
    suite = tmp_path / "checks.yaml"
    suite.write_text(
        "tables:\n  - files: '*.parquet'\n    label: label\n    columns:\n      x: {max: 100}\n"
    )

    def write(seed: int, weights: list[float], x_max: float) -> None:
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 50, 600)
        x[17] = x_max
        label = np.array(["cat", "dog", "bird"])[rng.choice(3, 600, p=weights)]
        pq.write_table(pa.table({"x": x, "label": label}), folder / "t.parquet")

    write(1, [0.4, 0.35, 0.25], x_max=500.0)
    refused = shipyard(home, "data", "commit", str(folder), "-d", "train", "--checks", str(suite))
    assert refused.returncode == 1
    assert "quality.range:t.parquet:x" in refused.stderr and "Traceback" not in refused.stderr
    assert "train" not in shipyard(home, "data", "list").stdout  # nothing was committed

    write(1, [0.4, 0.35, 0.25], x_max=50.0)
    first = shipyard(home, "data", "commit", str(folder), "-d", "train", "--checks", str(suite))
    assert first.returncode == 0, first.stderr
    assert "ok quality.range:t.parquet:x" in first.stdout
    write(2, [0.8, 0.1, 0.1], x_max=50.0)
    second = shipyard(home, "data", "commit", str(folder), "-d", "train", "--checks", str(suite))
    assert second.returncode == 0, second.stderr

    shown = shipyard(home, "data", "show", "train@2")
    assert shown.returncode == 0, shown.stderr
    assert "poisoning signals:" in shown.stdout and "1 flagged" in shown.stdout
    assert "FLAGGED signal.label_shift:t.parquet: distribution shifted" in shown.stdout
    missing = shipyard(home, "data", "commit", str(folder), "-d", "train", "--checks", "nope.yaml")
    assert missing.returncode == 1 and "cannot read the suite file" in missing.stderr


def test_data_tag_rm_restore_and_pull(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.png").write_bytes(b"png")
    (folder / "notes.txt").write_bytes(b"notes")
    assert shipyard(home, "data", "commit", str(folder), "-d", "pics").returncode == 0
    (folder / "notes.txt").write_bytes(b"notes, again")
    assert shipyard(home, "data", "commit", str(folder), "-d", "pics").returncode == 0

    tagged = shipyard(home, "data", "tag", "pics@1", "golden")
    assert tagged.returncode == 0 and "pics@golden -> v1" in tagged.stdout
    moved = shipyard(home, "data", "tag", "pics@2", "golden")
    assert moved.returncode == 1 and "move it with --force" in moved.stderr
    out = tmp_path / "out"
    pulled = shipyard(home, "data", "pull", "pics@golden", str(out), "--include", "images/**")
    assert pulled.returncode == 0, pulled.stderr
    assert [p.name for p in out.rglob("*") if p.is_file()] == ["a.png"]

    removed = shipyard(home, "data", "rm", "pics@golden")
    assert removed.returncode == 0 and "deleted pics v1" in removed.stdout
    listed = shipyard(home, "data", "versions", "pics")
    assert "v2" in listed.stdout and "v1" not in listed.stdout
    assert "v1 (deleted)" in shipyard(home, "data", "versions", "pics", "--all").stdout
    gone = shipyard(home, "data", "show", "pics@1")
    assert gone.returncode == 1 and "data restore pics@1" in gone.stderr
    assert shipyard(home, "data", "restore", "pics@1").returncode == 0
    assert "golden" in shipyard(home, "data", "versions", "pics").stdout
    no_version = shipyard(home, "data", "rm", "pics")
    assert no_version.returncode == 1 and "name the version" in no_version.stderr


def test_data_transform_from_the_working_folder_is_cached(home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    folder.mkdir()
    pq.write_table(pa.table({"x": list(range(10))}), folder / "t.parquet")
    assert shipyard(home, "data", "commit", str(folder), "-d", "raw").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.py").write_text(
        "import pyarrow.compute as pc\n"
        "def scale(batch, factor=1):\n"
        "    return batch.set_column(0, 'x', pc.multiply(batch['x'], factor))\n"
    )
    argv = ["data", "transform", "raw@1", "--fn", "steps:scale", "--to", "scaled"]
    first = shipyard(home, *argv, "--params", '{"factor": 3}', "--workers", "1", cwd=work)
    assert first.returncode == 0, first.stderr
    assert "dataset scaled v1: 1 files" in first.stdout and "steps:scale of raw@v1" in first.stdout
    again = shipyard(home, *argv, "--params", '{"factor": 3}', "--workers", "1", cwd=work)
    assert again.returncode == 0 and "dataset scaled v1" in again.stdout  # the cached version
    out = tmp_path / "out"
    assert shipyard(home, "data", "checkout", "scaled@1", str(out)).returncode == 0
    assert pq.read_table(out / "t.parquet")["x"].to_pylist() == [3 * i for i in range(10)]

    bad = shipyard(home, *argv, "--params", "{factor: 3}", cwd=work)
    assert bad.returncode == 1 and "--params is not valid JSON" in bad.stderr
    missing = shipyard(home, *argv[:3], "--fn", "nowhere:scale", "--to", "scaled", cwd=work)
    assert missing.returncode == 1 and "module 'nowhere' cannot be imported" in missing.stderr
