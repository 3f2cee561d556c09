"""The path-traversal battery shared by the lexical checks (domain.names) and the on-disk ones
(security.paths). Each case: (id, user-supplied value)."""

from __future__ import annotations

UNSAFE_PATHS: list[tuple[str, str]] = [
    ("dotdot-slash", "../x"),
    ("dotdot-only", ".."),
    ("dotdot-inside", "a/../../x"),
    ("dotdot-backslash", "..\\x"),
    ("backslash-inside", "a\\b"),
    ("pct-dots-slash", "%2e%2e%2f"),
    ("pct-dots-slash-upper", "%2E%2E%2Fx"),
    ("pct-dots", "%2e%2e/x"),
    ("dotdot-pct-slash", "..%2fx"),
    ("double-pct", "%252e%252e%252f"),
    ("pct-nul", "x%00"),
    ("absolute", "/etc/passwd"),
    ("home", "~/x"),
    ("file-url", "file:///etc/passwd"),
    ("http-url", "http://example.invalid/x"),
    ("drive-backslash", "C:\\x"),
    ("drive-relative", "C:x"),
    ("drive-slash", "C:/x"),
    ("unc", "//server/x"),
    ("unc-backslash", "\\\\server\\x"),
    ("double-slash", "a//b"),
    ("trailing-slash", "a/"),
    ("dot-segment", "a/./b"),
    ("leading-dot-segment", "./a"),
    ("fragment", "x#frag"),
    ("query", "x?q"),
    ("nul", "x\x00y"),
    ("newline", "x\ny"),
    ("del", "x\x7f"),
    ("c1-control", "x\x85y"),
    ("line-separator", "x\u2028y"),
    ("surrogate", "x\udcffy"),
    ("fullwidth-dots-slash", "．．／x"),
    ("fullwidth-dots", "．．/x"),
    ("one-dot-leader", "\u2024\u2024/x"),
    ("fullwidth-solidus", "a／b"),
    ("trailing-dot", "a."),
    ("trailing-dot-segment", "a./b"),
    ("three-dots", ".../x"),
    ("trailing-space", "a "),
    ("leading-space", " a"),
    ("space-segment", "a/ /b"),
    ("empty", ""),
    ("too-long", "a/" * 600),
    # invisible format characters (category Cf): 'evil\u202etxt.exe' displays as 'evilexe.txt'
    ("bidi-override", "invoice\u202egpj.exe"),
    ("bidi-isolate", "a\u2066b\u2069"),
    ("zero-width-space", "a\u200bb"),
    ("zero-width-joiner", "a\u200db"),
    ("bom", "\ufeffa"),
    ("soft-hyphen", "pass\u00adwd"),
    # look-alike slashes: they show a folder that does not exist
    ("division-slash", "a\u2215b"),
    ("fraction-slash", "..\u2044etc\u2044passwd"),
    ("fullwidth-reverse-solidus", "a\uff3cb"),
    ("set-minus", "a\u2216b"),
    ("big-solidus", "a\u29f8b"),
    ("box-diagonal", "a\u2571b"),
    ("combining-solidus-overlay", "a\u0338b"),
]

# Names that are also not valid resource names (validate_name) - every case above, plus these.
UNSAFE_NAMES: list[tuple[str, str]] = [
    *[(case_id, value) for case_id, value in UNSAFE_PATHS if value != "a/" * 600],
    ("slash", "a/b"),
    ("leading-dot", ".hidden"),
    ("leading-dash", "-rf"),
    ("dotdot-in-name", "a..b"),
    ("too-long-name", "a" * 129),
    ("unicode-letter", "café"),
    ("tab", "a\tb"),
]

SAFE_PATHS = [
    "a/b.parquet",
    "images/0001.png",
    "x",
    "a.b/c-d_e.f",
    ".hidden/file",
    "deep/" * 50 + "f",
]
SAFE_NAMES = ["faces", "digits-mlp", "v1.0", "A_b-9", "x" * 128, "0day"]
