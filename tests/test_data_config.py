"""The data config: defaults are valid, and every invalid field is reported by its key."""

import subprocess
import sys

import pytest

from hymba_jax.data import DataConfigError, default_data_config, validate_data_config


def test_default_config_is_valid():
    validate_data_config(default_data_config())


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("source", "web", "data.source"),
        ("val_fraction", 0.0, "data.val_fraction"),
        ("val_fraction", 1.5, "data.val_fraction"),
        ("tokenizer", "/no/such/tokenizer.model", "data.tokenizer"),
        ("vocab_size", 100, "data.vocab_size"),
        ("text_key", "", "data.text_key"),
        ("packing_bins", 0, "data.packing_bins"),
        ("num_workers", -1, "data.num_workers"),
    ],
)
def test_invalid_field_is_named(field, value, named):
    config = default_data_config()
    config[field] = value
    with pytest.raises(DataConfigError, match=named):
        validate_data_config(config)


def test_source_needs_its_settings():
    config = default_data_config()
    config.source = "tfds"
    with pytest.raises(DataConfigError, match="data.tfds_name"):
        validate_data_config(config)
    config.source = "files"
    with pytest.raises(DataConfigError, match="data.files"):
        validate_data_config(config)


def test_unknown_key_is_named():
    config = default_data_config()
    config.shuffle_buffer = 100
    with pytest.raises(DataConfigError, match="shuffle_buffer"):
        validate_data_config(config)


def test_data_package_does_not_import_model_or_training():
    script = "import sys, hymba_jax.data; print(sorted(m for m in sys.modules if m.startswith('hymba_jax.')))"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "hymba_jax.model" not in loaded and "hymba_jax.train" not in loaded
