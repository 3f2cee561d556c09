"""Validation of user-supplied names and relative paths.

Names (projects, datasets, models, deployments, artifact names) are a conservative slug so they are
safe in URLs, file names and SQL alike. Relative paths (files inside a dataset, artifact paths) are
checked lexically here; ``security.paths`` adds the resolve-on-disk check against a root.

Peers' traversal fixes were bypassed again and again by encodings, so the lexical check rejects,
rather than normalises, everything suspicious: percent-encoding of any kind, backslashes, NUL and
control characters, absolute and drive paths, URL schemes, empty or dot segments, fragments and
queries, Unicode that NFKC-folds to something different (fullwidth dots and slashes), invisible
format characters (category Cf: bidi overrides such as U+202E that make ``exe.txt`` display as
``txt.exe``, zero-width joiners, the BOM), and characters that look like a slash or backslash but
are not one (U+2215 DIVISION SLASH, U+2044 FRACTION SLASH, U+FF3C, ...), which would show a
reviewer a folder that does not exist. Names are ASCII slugs, so none of those can reach one.
"""

from __future__ import annotations

import re
import unicodedata

from shipyard.errors import InvalidInputError, UnsafePathError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_PATH_LEN = 1024
# The same rules as JSON Schema for the OpenAPI (``pattern`` without look-arounds, so generated
# clients and validators in any language understand them). NAME_PATTERN + NAME_MAX_LEN accept
# exactly what ``validate_name`` accepts; PATH_PATTERN is a necessary condition of
# ``validate_relative_path`` (the characters and starts it always refuses), which stays the rule.
NAME_MAX_LEN = 128
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$"
PATH_PATTERN = r"^[^/~\\%#?\x00-\x1f\x7f-\x9f][^\\%#?\x00-\x1f\x7f-\x9f]*$"
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
LOOKALIKE_SLASHES = frozenset(
    "\u2215"  # DIVISION SLASH
    "\u2044"  # FRACTION SLASH
    "\u2216"  # SET MINUS
    "\u29f5"  # REVERSE SOLIDUS OPERATOR
    "\u29f8"  # BIG SOLIDUS
    "\u29f9"  # BIG REVERSE SOLIDUS
    "\u2afd"  # DOUBLE SOLIDUS OPERATOR
    "\u2afb"  # TRIPLE SOLIDUS BINARY RELATION
    "\u27cb"  # MATHEMATICAL RISING DIAGONAL
    "\u27cd"  # MATHEMATICAL FALLING DIAGONAL
    "\u2571"  # BOX DRAWINGS LIGHT DIAGONAL UPPER RIGHT TO LOWER LEFT
    "\u2572"  # BOX DRAWINGS LIGHT DIAGONAL UPPER LEFT TO LOWER RIGHT
    "\u244a"  # OCR DOUBLE BACKSLASH
    "\u1735"  # PHILIPPINE SINGLE PUNCTUATION
    "\u0338"  # COMBINING LONG SOLIDUS OVERLAY
    "\u20e5"  # COMBINING REVERSE SOLIDUS OVERLAY
    "\u20eb"  # COMBINING LONG DOUBLE SOLIDUS OVERLAY
    "\uff0f"  # FULLWIDTH SOLIDUS (NFKC folds it too)
    "\uff3c"  # FULLWIDTH REVERSE SOLIDUS (NFKC folds it too)
    "\ufe68"  # SMALL REVERSE SOLIDUS (NFKC folds it too)
)
"""Characters that render like ``/`` or ``\\`` but are not path separators."""


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
    if format_char := next((c for c in value if unicodedata.category(c) == "Cf"), None):
        raise bad(
            f"it contains the invisible format character U+{ord(format_char):04X} "
            f"({unicodedata.name(format_char, 'unnamed')}), e.g. a bidi override that makes a "
            "name display differently from what it is"
        )
    if slash := next((c for c in value if c in LOOKALIKE_SLASHES), None):
        raise bad(
            f"it contains U+{ord(slash):04X} ({unicodedata.name(slash, 'unnamed')}), which looks "
            "like a slash but is not one; use '/' to separate folders"
        )
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
