"""Code snapshots: a job runs the code as it was when it was submitted, not as it is now.

``snapshot_code`` packs a folder into a reproducible tar.gz (sorted names, zeroed times and owners,
so the same code gives the same bytes and the blob store keeps it once). It leaves out what git
would: every ``.gitignore`` rule applies (nested files relative to their folder, negations, those
of the folders above ``code_dir`` up to its repository's top, and ``.git/info/exclude``), so an
ignored 60 MB checkpoint is never read, let alone refused; ``.git`` itself is never included.
``code_source`` records where the code came from: the commit of ``HEAD`` and whether the folder
has uncommitted changes (``git``, when there is a repository), and how many entries were ignored.
``extract_code`` unpacks
one into a job's folder and trusts nothing in it: every member name goes through the lexical check
and ``safe_join``, only regular files and folders are written (no links, devices or FIFOs), and the
total size is bounded, so a crafted archive can neither escape the folder nor fill the disk.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pathspec import GitIgnoreSpec

from shipyard.domain.models import CodeSource
from shipyard.domain.names import validate_relative_path
from shipyard.errors import InvalidInputError, PayloadTooLargeError, UnsafePathError
from shipyard.security.paths import safe_join

CODE_BUDGET_BYTES = 50 * 1024 * 1024
MAX_MEMBERS = 100_000
# Folders that are environments, caches or history, never code the job needs.
SKIP_DIRS = frozenset(
    {".git", ".hg", ".svn", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
SKIP_SUFFIXES = (".pyc", ".pyo")
IGNORE_FILE = ".gitignore"
# A .gitignore larger than this is read only up to here (it is rules, not data).
MAX_IGNORE_FILE_BYTES = 1024 * 1024
# git is asked about the repository with this timeout; past it the source is left unknown.
GIT_TIMEOUT_S = 5.0


def snapshot_code(code_dir: str | Path, *, budget: int = CODE_BUDGET_BYTES) -> bytes:
    """A tar.gz of the regular files under ``code_dir`` (see ``SKIP_DIRS``), at most ``budget``.

    Symlinks are followed while they stay inside ``code_dir``; one that points out is refused
    (:class:`UnsafePathError`), as are file names that could not be extracted safely.
    """
    root = _code_root(code_dir)
    files, _ = _code_files(root)
    total = sum(size for _, _, size in files)
    if total > budget:
        biggest = max(files, key=lambda item: item[2])
        raise PayloadTooLargeError(
            f"code_dir {str(code_dir)!r} holds {_mb(total)} of files, more than the "
            f"{_mb(budget)} a code snapshot may hold (the largest is {biggest[0]!r}, "
            f"{_mb(biggest[2])}); commit data as a dataset and read it from the job instead",
            field="code_dir",
        )
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for rel, real, size in files:
            info = tarfile.TarInfo(rel)
            info.size = size
            info.mode = 0o755 if os.access(real, os.X_OK) else 0o644
            info.mtime = 0
            with open(real, "rb") as fh:
                tar.addfile(info, fh)
    return buffer.getvalue()


def code_source(code_dir: str | Path) -> CodeSource:
    """Where the code in ``code_dir`` comes from: the git commit of ``HEAD`` and whether the
    folder has changes not committed (modified, staged, or untracked files that are not ignored),
    when it is in a repository and ``git`` answers within :data:`GIT_TIMEOUT_S` (else None);
    and how many files or folders ``.gitignore`` rules left out of its snapshot (a folder counts
    once)."""
    root = _code_root(code_dir)
    _, ignored = _code_files(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None:
        return CodeSource(ignored_files=ignored)
    commit = _git(root, "rev-parse", "--verify", "--quiet", "HEAD")
    status = _git(root, "status", "--porcelain", "--untracked-files=normal", "--", ".")
    return CodeSource(
        git_commit=(commit.strip() or None) if commit is not None else None,
        git_dirty=bool(status.strip()) if status is not None else None,
        ignored_files=ignored,
    )


def extract_code(archive: bytes, dest: str | Path, *, budget: int = CODE_BUDGET_BYTES) -> int:
    """Unpack a code snapshot into ``dest`` (created if missing); return the number of files.

    Raises :class:`UnsafePathError` (field ``code``) for a member whose name could leave ``dest``
    or that is not a regular file or folder, and :class:`PayloadTooLargeError` past ``budget``.
    """
    root = Path(dest)
    root.mkdir(parents=True, exist_ok=True)
    count = 0
    with _open(archive) as tar:
        for member in _checked_members(tar, budget):
            target = safe_join(root, member.name, field="code")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            if source is None:  # pragma: no cover - regular files always have data
                continue
            mode = 0o755 if member.mode & 0o111 else 0o644
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(1024 * 1024):
                    out.write(chunk)
            os.chmod(target, mode)
            count += 1
    return count


def list_code(archive: bytes, *, budget: int = CODE_BUDGET_BYTES) -> list[str]:
    """The file names in a code snapshot, after the same checks as :func:`extract_code`.

    Lets a server vet an uploaded snapshot at submit time rather than fail the job later.
    """
    with _open(archive) as tar:
        return [m.name for m in _checked_members(tar, budget) if m.isfile()]


def _code_root(code_dir: str | Path) -> Path:
    root = Path(code_dir)
    if not root.is_dir():
        raise InvalidInputError(
            f"code_dir {str(code_dir)!r} is not a folder; pass the folder that holds the code",
            field="code_dir",
        )
    return root


@dataclass(frozen=True, slots=True)
class _Rules:
    """The rules of one .gitignore, and its folder relative to the top ("" for the top)."""

    base: str
    spec: GitIgnoreSpec

    def verdict(self, path: str, is_dir: bool) -> bool | None:
        """True: ignored, False: re-included (``!``), None: no rule of this file matches."""
        if self.base:
            if not path.startswith(self.base + "/"):
                return None
            path = path[len(self.base) + 1 :]
        return self.spec.check_file(path + "/" if is_dir else path).include


def _code_files(root: Path) -> tuple[list[tuple[str, Path, int]], int]:
    """``(relative posix path, real path, size)`` of every file to pack, sorted by path, and how
    many entries ``.gitignore`` rules left out (an ignored folder counts once, unwalked)."""
    real_root = Path(os.path.realpath(root))
    top, prefix = _repository_top(real_root)
    rules = _outer_rules(real_root, top)
    if _folder_ignored(prefix, rules):
        rules = []  # code_dir sits in an ignored folder: it was chosen, so take it as it is
    found: list[tuple[str, Path, int]] = []
    ignored = 0
    # The rules in force in each folder walked: inherited ones, then its own .gitignore.
    in_force: dict[str, list[_Rules]] = {}
    for dirpath, dirnames, filenames in os.walk(real_root, followlinks=False):
        here = Path(dirpath)
        rel_here = here.relative_to(real_root).as_posix()
        rel_here = "" if rel_here == "." else rel_here
        parent = rel_here.rpartition("/")[0] if rel_here else None
        active = list(in_force.get(parent, rules) if parent is not None else rules)
        if IGNORE_FILE in filenames:
            own = _read_rules(real_root, _join(rel_here, IGNORE_FILE), _join(prefix, rel_here))
            if own is not None:
                active.append(own)
        in_force[rel_here] = active

        def left_out(rel: str, is_dir: bool, active: list[_Rules] = active) -> bool:
            path = _join(prefix, rel)
            for rule in reversed(active):  # the deepest .gitignore with a matching rule decides
                verdict = rule.verdict(path, is_dir)
                if verdict is not None:
                    return verdict
            return False

        kept: list[str] = []
        for name in sorted(dirnames):
            if name in SKIP_DIRS:
                continue
            full = here / name
            rel = _join(rel_here, name)
            if left_out(rel, True):
                ignored += 1
                continue
            if full.is_symlink():
                # Checked (it must not point out) but not entered: its target is walked in place.
                safe_join(real_root, rel, field="code_dir")
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            if name.endswith(SKIP_SUFFIXES) or name == ".git":  # a worktree's or submodule's
                continue
            rel = _join(rel_here, name)
            if left_out(rel, False):
                ignored += 1
                continue
            real = safe_join(real_root, rel, field="code_dir")
            if real.is_file():
                found.append((rel, real, real.stat().st_size))
    found.sort(key=lambda item: item[0])
    return found, ignored


def _folder_ignored(prefix: str, rules: list[_Rules]) -> bool:
    """True when the folder ``prefix`` (relative to the top) or one above it is ignored."""
    parts = prefix.split("/") if prefix else []
    for depth in range(1, len(parts) + 1):
        path = "/".join(parts[:depth])
        for rule in reversed(rules):
            verdict = rule.verdict(path, True)
            if verdict is not None:
                if verdict:
                    return True
                break
    return False


def _join(base: str, name: str) -> str:
    return f"{base}/{name}" if base else name


def _repository_top(root: Path) -> tuple[Path, str]:
    """The top of the git work tree ``root`` is in (a folder holding ``.git``), and ``root``
    relative to it; ``root`` itself and "" when it is in none."""
    for folder in (root, *root.parents):
        if os.path.lexists(folder / ".git"):
            rel = root.relative_to(folder).as_posix()
            return folder, "" if rel == "." else rel
    return root, ""


def _outer_rules(root: Path, top: Path) -> list[_Rules]:
    """The rules that apply to ``root`` from outside it: ``.git/info/exclude`` and the
    .gitignore files of the folders from the repository's top down to ``root``'s parent."""
    rules: list[_Rules] = []
    exclude = top / ".git" / "info" / "exclude"
    if exclude.is_file():
        rules.append(_Rules("", GitIgnoreSpec.from_lines(_read_lines(exclude))))
    if top == root:
        return rules
    folder = top
    parts = root.relative_to(top).parts
    for depth in range(len(parts)):
        path = folder / IGNORE_FILE
        if path.is_file():
            base = "/".join(parts[:depth])
            rules.append(_Rules(base, GitIgnoreSpec.from_lines(_read_lines(path))))
        folder = folder / parts[depth]
    return rules


def _read_rules(root: Path, rel: str, base: str) -> _Rules | None:
    """The rules of the .gitignore at ``rel`` in ``root`` (confined like every file we read)."""
    real = safe_join(root, rel, field="code_dir")
    if not real.is_file():
        return None
    return _Rules(base, GitIgnoreSpec.from_lines(_read_lines(real)))


def _read_lines(path: Path) -> list[str]:
    with open(path, "rb") as fh:
        data = fh.read(MAX_IGNORE_FILE_BYTES)
    return data.decode("utf-8", errors="replace").splitlines()


def _git(cwd: Path, *args: str) -> str | None:
    """``git args`` run in ``cwd``: its output, or None when git is missing, fails or hangs."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.decode("utf-8", errors="replace")


def _open(archive: bytes) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InvalidInputError(f"code snapshot is not a tar.gz: {exc}", field="code") from None


def _checked_members(tar: tarfile.TarFile, budget: int) -> Iterator[tarfile.TarInfo]:
    """Members with safe names, of safe kinds, within the budget; raises on the first bad one."""
    total = 0
    try:
        for index, member in enumerate(tar):
            if index >= MAX_MEMBERS:
                raise PayloadTooLargeError(
                    f"code snapshot has more than {MAX_MEMBERS} members", field="code"
                )
            validate_relative_path(member.name, field="code")
            if not (member.isfile() or member.isdir()):
                raise UnsafePathError(
                    f"code snapshot member {member.name!r} is a {_kind(member)}; only regular "
                    "files and folders are extracted",
                    field="code",
                )
            total += member.size if member.isfile() else 0
            if total > budget:
                raise PayloadTooLargeError(
                    f"code snapshot unpacks to more than {_mb(budget)}", field="code"
                )
            yield member
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InvalidInputError(f"code snapshot is damaged: {exc}", field="code") from None


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev():
        return "device or FIFO"
    return "special file"


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"
