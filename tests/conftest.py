"""Shared test fixtures: the reference fixtures made by the released PyTorch implementation.

They are vendored under tests/fixtures/reference (see its README), so every parity test runs in a plain
clone; the project's ../shared directory is not needed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parent / "fixtures" / "reference"
TINY_A = REFERENCE / "hymba-tiny-a"
RELEASED_1P5B = REFERENCE / "hymba-1.5b"


@pytest.fixture(scope="session")
def tiny_a_dir() -> Path:
    return TINY_A / "checkpoint"


@pytest.fixture(scope="session")
def tiny_a_expected():
    import numpy as np

    return dict(np.load(TINY_A / "expected.npz"))


@pytest.fixture(scope="session")
def tiny_a(tiny_a_dir):
    """(config, fp32 params) of the hymba-tiny-a fixture."""
    from hymba_jax.hf import load_hf_checkpoint

    return load_hf_checkpoint(tiny_a_dir)


def random_params(config, seed: int = 0, scale: float = 0.1):
    """Random parameters drawn on the host for `config` (no RNG compile: fast on CPU)."""
    import jax
    import numpy as np

    from hymba_jax.model import param_shapes

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (rng.normal(size=s.shape) * scale).astype(s.dtype),
                                  param_shapes(config))
