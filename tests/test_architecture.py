"""The layering in docs/CONVENTIONS.md, enforced: import-linter's contracts (pyproject.toml) are
kept, they really catch a violation, and the domain imports no I/O library."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "shipyard"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"][
    "contracts"
]

# Modules that do I/O (files, network, processes, databases); the domain is pure.
THIRD_PARTY_IO = {
    "sqlalchemy",
    "alembic",
    "psycopg",
    "httpx",
    "fsspec",
    "s3fs",
    "boto3",
    "requests",
    "urllib3",
    "pyarrow",
    "duckdb",
    "fastapi",
    "starlette",
    "uvicorn",
    "psutil",
    "ray",
    "torch",
    "onnxruntime",
    "blake3",
}
IO_MODULES = THIRD_PARTY_IO | {
    "os",
    "io",
    "pathlib",
    "shutil",
    "tempfile",
    "glob",
    "socket",
    "ssl",
    "select",
    "selectors",
    "subprocess",
    "multiprocessing",
    "asyncio",
    "sqlite3",
    "urllib",
    "http",
    "mmap",
    "signal",
}


def lint_imports(*, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (pip install -e '.[dev]')")
    env = {**os.environ, "NO_COLOR": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(cwd / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def test_import_contracts_are_kept() -> None:
    result = lint_imports(cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in output, output
    for contract in CONTRACTS:
        assert re.search(rf"^{re.escape(contract['name'])} KEPT", output, re.M), contract["name"]


def test_the_contracts_catch_violations(tmp_path: Path) -> None:
    """A copy of the package with one violation per contract: each contract reports it."""
    copy = tmp_path / "src" / "shipyard"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    violations = {
        copy / "store" / "__init__.py": "import shipyard.security",  # upwards
        copy / "client" / "__init__.py": "import shipyard.server",  # SDK -> server
        copy / "settings.py": "import shipyard.store",  # below everything
        copy / "domain" / "jobs.py": "import sqlite3",  # I/O in the domain
        copy / "compute" / "policy" / "base.py": "import time",  # a clock in a policy
    }
    for path, line in violations.items():
        path.write_text(path.read_text() + f"\n{line}  # injected by test_architecture\n")

    result = lint_imports(cwd=tmp_path, pythonpath=tmp_path / "src")
    output = result.stdout + result.stderr

    assert result.returncode == 1, output
    assert f"Contracts: 0 kept, {len(CONTRACTS)} broken." in output, output
    assert "shipyard.store -> shipyard.security" in output
    assert "shipyard.domain.jobs -> sqlite3" in output
    assert "shipyard.compute.policy.base -> time" in output


def _top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and getattr(
            node.func, "attr", getattr(node.func, "id", "")
        ) in ("import_module", "__import__"):
            names.add("<dynamic import>")
    return names


@pytest.mark.parametrize(
    "module", sorted(p.relative_to(SRC).as_posix() for p in (SRC / "domain").rglob("*.py"))
)
def test_domain_modules_import_no_io_library(module: str) -> None:
    imported = _top_level_imports(SRC / module)
    roots = {name.split(".")[0] for name in imported}
    assert not roots & IO_MODULES, f"domain/{module} imports {sorted(roots & IO_MODULES)}"
    assert "<dynamic import>" not in imported, f"domain/{module} imports dynamically"
    ours = {name for name in imported if name.split(".")[0] == "shipyard"}
    assert all(n == "shipyard.errors" or n.startswith("shipyard.domain") for n in ours), ours


def test_importing_the_domain_loads_no_io_library() -> None:
    """At run time too: nothing the domain imports pulls a third-party I/O library in behind it
    (pydantic itself loads a few standard modules such as socket, so those are not checked)."""
    modules = sorted(
        ".".join(("shipyard", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        for p in (SRC / "domain").rglob("*.py")
    )
    probe = (
        "import importlib, sys\n"
        "before = set(sys.modules)\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted(set(sys.modules) - before)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(result.stdout.split())
    roots = {name.split(".")[0] for name in loaded}
    assert "pydantic" in roots  # the probe does see what gets imported
    assert not roots & THIRD_PARTY_IO, sorted(roots & THIRD_PARTY_IO)
    ours = {
        name
        for name in loaded
        if name.startswith("shipyard.")
        and not name.startswith(("shipyard.domain", "shipyard.errors"))
    }
    assert not ours, sorted(ours)
