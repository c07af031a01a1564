"""The reference fixtures the parity tests read are vendored in the repository (tests/fixtures/reference),
so a plain clone runs them all; where the project's ../shared/reference exists, they are its files."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REFERENCE

TESTS = Path(__file__).resolve().parent
SHARED_REFERENCE = TESTS.parent.parent / "shared" / "reference"
FILES = ["hymba-1.5b/config.json", "hymba-1.5b/state_dict.txt", "hymba-tiny-a/expected.npz",
         "hymba-tiny-a/checkpoint/config.json", "hymba-tiny-a/checkpoint/model.safetensors"]


@pytest.mark.parametrize("name", FILES)
def test_fixture_is_vendored_and_equals_the_shared_one(name):
    vendored = REFERENCE / name
    assert vendored.is_relative_to(TESTS) and vendored.is_file(), vendored
    shared = SHARED_REFERENCE / name
    if shared.is_file():
        assert vendored.read_bytes() == shared.read_bytes(), f"{vendored} differs from {shared}; copy it again"
