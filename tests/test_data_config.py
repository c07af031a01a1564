"""The data config: defaults are valid, and every invalid field is reported by its key."""

import ast
from pathlib import Path

import pytest

import hymba_jax.data
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
    """Checked on the sources: `hymba_jax/__init__.py` itself loads the model for its own exports."""
    for module in Path(hymba_jax.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith(("hymba_jax.model", "hymba_jax.train")) for n in names), module
