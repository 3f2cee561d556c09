"""domain.names: the lexical checks reject every traversal trick and name the field."""

from __future__ import annotations

import pytest

from shipyard.domain.names import LOOKALIKE_SLASHES, validate_name, validate_relative_path
from shipyard.errors import InvalidInputError, UnsafePathError
from tests.domain.cases import SAFE_NAMES, SAFE_PATHS, UNSAFE_NAMES, UNSAFE_PATHS

FIELD = "files[3].path"


@pytest.mark.parametrize("value", [v for _, v in UNSAFE_PATHS], ids=[i for i, _ in UNSAFE_PATHS])
def test_unsafe_relative_paths_are_rejected_naming_the_field(value: str) -> None:
    with pytest.raises(UnsafePathError) as caught:
        validate_relative_path(value, field=FIELD)
    assert caught.value.field == FIELD
    assert caught.value.message.startswith(f"{FIELD} ")
    assert caught.value.code == "unsafe_path" and caught.value.http_status == 400


@pytest.mark.parametrize("value", [None, 7, b"a/b"], ids=["none", "int", "bytes"])
def test_a_relative_path_must_be_a_string(value: object) -> None:
    with pytest.raises(UnsafePathError) as caught:
        validate_relative_path(value, field=FIELD)  # type: ignore[arg-type]
    assert caught.value.field == FIELD and "string" in caught.value.message


@pytest.mark.parametrize("value", SAFE_PATHS)
def test_legit_relative_paths_pass_unchanged(value: str) -> None:
    assert validate_relative_path(value, field=FIELD) == value


def test_the_default_field_is_path() -> None:
    with pytest.raises(UnsafePathError) as caught:
        validate_relative_path("../x")
    assert caught.value.field == "path" and caught.value.message.startswith("path ")


@pytest.mark.parametrize("value", [v for _, v in UNSAFE_NAMES], ids=[i for i, _ in UNSAFE_NAMES])
def test_invalid_names_are_rejected_naming_the_field(value: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        validate_name(value, field="dataset")
    assert type(caught.value) is InvalidInputError
    assert caught.value.field == "dataset"
    assert caught.value.message.startswith("dataset ")
    assert caught.value.to_dict()["field"] == "dataset"


@pytest.mark.parametrize("value", [None, 7], ids=["none", "int"])
def test_a_name_must_be_a_string(value: object) -> None:
    with pytest.raises(InvalidInputError) as caught:
        validate_name(value, field="model")  # type: ignore[arg-type]
    assert caught.value.field == "model"


@pytest.mark.parametrize("value", SAFE_NAMES)
def test_valid_names_pass_unchanged(value: str) -> None:
    assert validate_name(value, field="dataset") == value


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("report\u202eexe.txt", "U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("a\u200bb", "U+200B (ZERO WIDTH SPACE)"),
        ("a\u2215b", "U+2215 (DIVISION SLASH)"),
        ("a\u2044b", "U+2044 (FRACTION SLASH)"),
        ("a\uff3cb", "U+FF3C (FULLWIDTH REVERSE SOLIDUS)"),
    ],
)
def test_format_characters_and_look_alike_slashes_are_named_in_the_error(
    value: str, shown: str
) -> None:
    with pytest.raises(UnsafePathError) as caught:
        validate_relative_path(value, field="files[2].path")
    assert caught.value.field == "files[2].path" and shown in caught.value.message
    with pytest.raises(InvalidInputError) as named:
        validate_name(value, field="name")
    assert named.value.field == "name"


def test_every_look_alike_slash_is_refused_and_real_letters_are_not() -> None:
    for char in LOOKALIKE_SLASHES:
        with pytest.raises(UnsafePathError):
            validate_relative_path(f"a{char}b")
    for legit in ("données/été.csv", "日本/ノート.txt", "a-b_c.d"):
        assert validate_relative_path(legit) == legit
