"""Validation of user-supplied names and relative paths.

Names (projects, datasets, models, deployments, artifact names) are a conservative slug so they are
safe in URLs, file names and SQL alike. Relative paths (files inside a dataset, artifact paths) are
checked lexically here; ``security.paths`` adds the resolve-on-disk check against a root.

Peers' traversal fixes were bypassed again and again by encodings, so the lexical check rejects,
rather than normalises, everything suspicious: percent-encoding of any kind, backslashes, NUL and
control characters, absolute and drive paths, URL schemes, empty or dot segments, fragments and
queries, and Unicode that NFKC-folds to something different (fullwidth dots and slashes).
"""

from __future__ import annotations

import re
import unicodedata

from shipyard.errors import InvalidInputError, UnsafePathError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_PATH_LEN = 1024
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def validate_name(value: str, *, field: str = "name") -> str:
    """Return ``value`` if it is a valid resource name, else raise naming the field."""
    if (
        not isinstance(value, str)
        or not NAME_RE.fullmatch(value)
        or ".." in value
        or value.endswith(".")  # Windows and some file systems drop it: 'a.' would be 'a'
    ):
        raise InvalidInputError(
            f"{field} {value!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..' and not ending with '.'",
            field=field,
        )
    return value


def validate_relative_path(value: str, *, field: str = "path") -> str:
    """Return ``value`` (a '/'-separated relative path) if it can never leave its root.

    Raises :class:`UnsafePathError` naming the field and the reason otherwise.
    """

    def bad(reason: str) -> UnsafePathError:
        return UnsafePathError(f"{field} {value!r} is not allowed: {reason}", field=field)

    if not isinstance(value, str):
        raise bad("it must be a string")
    if value == "":
        raise bad("it is empty")
    if len(value) > MAX_PATH_LEN:
        raise bad(f"it is longer than {MAX_PATH_LEN} characters")
    # Cc: C0/C1 controls and DEL; Cs: lone surrogates (undecodable bytes in a file name, which
    # no database would store); Zl/Zp: line and paragraph separators.
    if any(unicodedata.category(c) in _FORBIDDEN_CATEGORIES for c in value):
        raise bad("it contains a NUL, control, separator or undecodable character")
    if unicodedata.normalize("NFKC", value) != value:
        raise bad("it contains characters that normalise to others (e.g. fullwidth dots)")
    if "%" in value:
        raise bad("percent-encoded characters are not accepted")
    if "\\" in value:
        raise bad("backslashes are not accepted; use '/'")
    if "#" in value or "?" in value:
        raise bad("'#' and '?' are not accepted")
    if value.startswith("/") or value.startswith("~"):
        raise bad("it must be relative, not absolute")
    if _SCHEME_RE.match(value):
        raise bad("URLs and drive letters are not accepted")
    parts = value.split("/")
    for part in parts:
        if part == "":
            raise bad("it contains an empty segment ('//' or a trailing '/')")
        if part in (".", ".."):
            raise bad("'.' and '..' segments are not accepted")
        if part.strip() != part or part.endswith("."):
            raise bad("segments must not start or end with spaces or end with '.'")
    return value
