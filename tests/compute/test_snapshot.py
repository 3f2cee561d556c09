"""Code snapshots: what goes in, and an extractor that trusts nothing."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from shipyard.compute.snapshot import code_source, extract_code, list_code, snapshot_code
from shipyard.domain.models import CodeSource
from shipyard.errors import InvalidInputError, PayloadTooLargeError, UnsafePathError
from tests.conftest import LiveServer


def make_code(root: Path) -> Path:
    (root / "pkg").mkdir(parents=True)
    (root / "train.py").write_text("print('train')\n")
    (root / "pkg" / "util.py").write_text("X = 1\n")
    run = root / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    for skipped in (".git", ".venv/bin", "__pycache__", "pkg/__pycache__"):
        (root / skipped).mkdir(parents=True, exist_ok=True)
        (root / skipped / "junk").write_text("x")
    (root / "pkg" / "util.cpython-311.pyc").write_bytes(b"\0")
    return root


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info


def test_snapshot_holds_the_code_and_skips_environments_and_caches(tmp_path: Path) -> None:
    archive = snapshot_code(make_code(tmp_path / "code"))
    assert sorted(list_code(archive)) == ["pkg/util.py", "run.sh", "train.py"]


def test_snapshot_is_reproducible(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    first = snapshot_code(code)
    os.utime(code / "train.py", (1, 1))
    assert snapshot_code(code) == first


def test_round_trip_keeps_content_and_the_executable_bit(tmp_path: Path) -> None:
    archive = snapshot_code(make_code(tmp_path / "code"))
    dest = tmp_path / "out"
    assert extract_code(archive, dest) == 3
    assert (dest / "pkg" / "util.py").read_text() == "X = 1\n"
    assert os.access(dest / "run.sh", os.X_OK)
    assert not os.access(dest / "train.py", os.X_OK)
    assert not (dest / ".git").exists()


def test_snapshot_over_budget_is_refused_naming_the_largest_file(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    with open(code / "weights.bin", "wb") as fh:
        fh.truncate(2000)  # sparse: costs no disk
    with pytest.raises(PayloadTooLargeError) as err:
        snapshot_code(code, budget=1000)
    assert err.value.field == "code_dir"
    assert "weights.bin" in err.value.message


def test_snapshot_refuses_a_symlink_that_points_out(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (tmp_path / "secret").write_text("s")
    (code / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError):
        snapshot_code(code)


def test_snapshot_follows_a_symlink_inside_the_folder(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (code / "alias.py").symlink_to(code / "train.py")
    dest = tmp_path / "out"
    extract_code(snapshot_code(code), dest)
    assert (dest / "alias.py").read_text() == "print('train')\n"
    assert not (dest / "alias.py").is_symlink()


def test_snapshot_of_a_missing_folder_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as err:
        snapshot_code(tmp_path / "nope")
    assert err.value.field == "code_dir"


@pytest.mark.parametrize(
    "bad",
    [
        member("../escape.txt"),
        member("a/../../escape.txt"),
        member("/etc/evil"),
        member("ok/..\\..\\evil"),
        member("link", tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("hard", tarfile.LNKTYPE, linkname="train.py"),
        member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("fifo", tarfile.FIFOTYPE),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "backslash",
        "symlink",
        "hardlink",
        "device",
        "fifo",
    ],
)
def test_extractor_refuses_members_that_could_escape_or_are_not_plain(
    tmp_path: Path, bad: tarfile.TarInfo
) -> None:
    data = b"pwned" if bad.type == tarfile.REGTYPE else None
    archive = tar_gz([(member("fine.txt"), b"ok"), (bad, data)])
    dest = tmp_path / "root" / "code"
    with pytest.raises(UnsafePathError) as err:
        extract_code(archive, dest)
    assert err.value.field == "code"
    with pytest.raises(UnsafePathError):
        list_code(archive)
    # Nothing was written outside the destination.
    assert not (tmp_path / "root" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["code"]


def test_extractor_does_not_write_through_a_symlink_already_in_place(tmp_path: Path) -> None:
    dest = tmp_path / "code"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        extract_code(tar_gz([(member("sub/x.txt"), b"pwned")]), dest)
    assert not (outside / "x.txt").exists()


def test_extractor_bounds_the_unpacked_size(tmp_path: Path) -> None:
    archive = tar_gz([(member("a.bin"), b"\0" * 600), (member("b.bin"), b"\0" * 600)])
    with pytest.raises(PayloadTooLargeError):
        extract_code(archive, tmp_path / "out", budget=1000)


def test_extractor_refuses_what_is_not_a_tar_gz(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError) as err:
        extract_code(b"not an archive", tmp_path / "out")
    assert err.value.field == "code"


# --- .gitignore and the code's source ------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, check=True)
    return done.stdout.decode()


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def test_an_ignored_60_mb_file_is_left_out_and_never_read(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (code / ".gitignore").write_text("*.ckpt\n")
    with open(code / "model.ckpt", "wb") as fh:
        fh.truncate(60 * 1024 * 1024)  # sparse: costs no disk, but 60 MB over the 50 MB budget
    (code / "model.ckpt").chmod(0)  # (for a user but root) opening it would fail
    archive = snapshot_code(code)
    assert sorted(list_code(archive)) == [".gitignore", "pkg/util.py", "run.sh", "train.py"]
    assert code_source(code).ignored_files == 1


def test_the_same_file_not_ignored_is_refused_as_before(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    with open(code / "model.ckpt", "wb") as fh:
        fh.truncate(60 * 1024 * 1024)
    with pytest.raises(PayloadTooLargeError) as err:
        snapshot_code(code)
    assert "model.ckpt" in err.value.message


def test_nested_gitignore_rules_are_relative_to_their_folder(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (code / ".gitignore").write_text("/out/\nlogs/\n")
    (code / "pkg" / ".gitignore").write_text("/local.py\ngenerated/\n")
    for rel in (
        "out/a.txt",
        "pkg/out/b.txt",  # "/out/" is anchored to the top folder: kept here
        "pkg/local.py",
        "local.py",  # "/local.py" is anchored to pkg/: kept at the top
        "pkg/generated/x.py",
        "pkg/sub/generated/y.py",  # unanchored in pkg/.gitignore: any depth below pkg
        "generated/z.py",  # outside pkg/: kept
        "deep/logs/c.log",
    ):
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(rel)
    names = set(list_code(snapshot_code(code)))
    assert {"pkg/out/b.txt", "local.py", "generated/z.py", "pkg/.gitignore"} <= names
    assert not names & {
        "out/a.txt",
        "pkg/local.py",
        "pkg/generated/x.py",
        "pkg/sub/generated/y.py",
        "deep/logs/c.log",
    }
    # out/, pkg/local.py, pkg/generated/, pkg/sub/generated/, deep/logs/ (folders count once)
    assert code_source(code).ignored_files == 5


def test_negations_re_include_files_but_not_inside_an_ignored_folder(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (code / ".gitignore").write_text("*.bin\n!keep.bin\ncache/\n!cache/wanted.bin\n")
    (code / "sub").mkdir()
    (code / "sub" / ".gitignore").write_text("!drop.bin\n")  # a deeper file overrides
    for rel in ("a.bin", "keep.bin", "sub/drop.bin", "sub/other.bin", "cache/wanted.bin"):
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(rel)
    names = set(list_code(snapshot_code(code)))
    assert {"keep.bin", "sub/drop.bin"} <= names
    # git cannot re-include a file whose folder is ignored; neither do we
    assert not names & {"a.bin", "sub/other.bin", "cache/wanted.bin"}


def test_git_is_never_included_even_when_a_rule_re_includes_it(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (code / ".gitignore").write_text("!.git\n!.git/\n")
    (code / "sub").mkdir()
    (code / "sub" / ".git").write_text("gitdir: ../.git/modules/sub\n")  # a submodule's pointer
    names = list_code(snapshot_code(code))
    assert not [name for name in names if ".git/" in name or name.endswith("/.git")]


def test_an_ignored_link_that_points_out_is_not_refused(tmp_path: Path) -> None:
    code = make_code(tmp_path / "code")
    (tmp_path / "data").mkdir()
    (code / "data").symlink_to(tmp_path / "data")
    (code / ".gitignore").write_text("data\n")
    assert "data" not in "".join(list_code(snapshot_code(code)))


@needs_git
def test_rules_of_the_repository_above_the_code_folder_apply(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("*.log\n")
    (repo / ".git" / "info").mkdir(exist_ok=True)
    (repo / ".git" / "info" / "exclude").write_text("secret.txt\n")
    code = make_code(repo / "project")
    shutil.rmtree(code / ".git")  # make_code's stand-in: here the repository is the one above
    (code / "run.log").write_text("log")
    (code / "secret.txt").write_text("s")
    assert sorted(list_code(snapshot_code(code))) == ["pkg/util.py", "run.sh", "train.py"]


@needs_git
def test_a_code_folder_inside_an_ignored_folder_is_taken_whole(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("scratch/\n")
    code = make_code(repo / "scratch" / "exp")
    shutil.rmtree(code / ".git")
    assert sorted(list_code(snapshot_code(code))) == ["pkg/util.py", "run.sh", "train.py"]


@needs_git
def test_code_source_records_the_commit_and_the_dirty_state(tmp_path: Path) -> None:
    repo = make_code(tmp_path / "repo")
    (repo / ".gitignore").write_text("*.ckpt\n")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    head = git(repo, "rev-parse", "HEAD").strip()
    clean = code_source(repo)
    assert clean.git_commit == head and len(head) == 40
    assert clean.git_dirty is False
    # An ignored file keeps it clean; an untracked file that is not ignored makes it dirty.
    (repo / "model.ckpt").write_text("w")
    assert code_source(repo).git_dirty is False
    assert code_source(repo).ignored_files == 1
    (repo / "notes.py").write_text("x")
    assert code_source(repo).git_dirty is True
    (repo / "notes.py").unlink()
    (repo / "train.py").write_text("print('changed')\n")
    dirty = code_source(repo)
    assert dirty.git_dirty is True and dirty.git_commit == head
    # A subfolder: only its own changes count.
    assert code_source(repo / "pkg") == CodeSource(git_commit=head, git_dirty=False)


@needs_git
def test_code_source_of_a_repository_without_commits(tmp_path: Path) -> None:
    repo = make_code(tmp_path / "repo")
    git(repo, "init", "-q")
    source = code_source(repo)
    assert source.git_commit is None and source.git_dirty is True


def test_code_source_without_a_repository_or_without_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = make_code(tmp_path / "code")
    assert code_source(code) == CodeSource()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git to be found
    assert code_source(code) == CodeSource()
    with pytest.raises(InvalidInputError) as err:
        code_source(tmp_path / "nope")
    assert err.value.field == "code_dir"


@needs_git
@pytest.mark.slow
def test_a_job_submitted_from_a_repository_records_its_source(tmp_path: Path) -> None:
    from shipyard.client.client import Client
    from shipyard.settings import Settings
    from tests.conftest import wait_for

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text("print('trained')\n")
    (repo / ".gitignore").write_text("*.ckpt\n")
    with open(repo / "big.ckpt", "wb") as fh:
        fh.truncate(60 * 1024 * 1024)  # would fail the submit if it were packed
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "train.py").write_text("print('trained, changed')\n")
    client = Client(settings=Settings(home=tmp_path / "home"))
    job = client.jobs.submit([sys.executable, "train.py"], code_dir=repo, project="p")
    head = git(repo, "rev-parse", "HEAD").strip()
    assert job.spec.source == CodeSource(git_commit=head, git_dirty=True, ignored_files=1)
    assert client.jobs.get(job.id, project="p").spec.source == job.spec.source
    done = wait_for(
        lambda: (j := client.jobs.get(job.id, project="p")).status.finished and j,
        what="the job to end",
    )
    assert done.status.value == "succeeded", done.message


@needs_git
@pytest.mark.slow
def test_a_job_sent_to_a_server_honours_gitignore_and_records_its_source(
    tmp_path: Path, live_server: LiveServer
) -> None:
    from shipyard.client.client import Client
    from shipyard.demo.lifecycle import follow_job
    from shipyard.settings import Settings
    from tests.job_user import job_command

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text("import os; print(sorted(os.listdir('.')))\n")
    (repo / ".gitignore").write_text("data/\n")
    (repo / "data").mkdir()
    with open(repo / "data" / "big.bin", "wb") as fh:
        fh.truncate(60 * 1024 * 1024)  # over the budget: the upload would be refused
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    remote = Client(settings=Settings(home=tmp_path / "unused", url=live_server.url))
    command, env = job_command("train.py")
    job = remote.jobs.submit(command, code_dir=repo, env=env)
    head = git(repo, "rev-parse", "HEAD").strip()
    assert job.spec.source == CodeSource(git_commit=head, git_dirty=False, ignored_files=1)
    lines: list[str] = []
    done = follow_job(remote, job.id, on_line=lines.append, timeout=120)
    assert done.status.value == "succeeded", (done.message, lines)
    assert "['.gitignore', 'train.py']" in lines, lines
    remote.close()
