"""The one way programs get a model and its tokenizer, from whatever the user has: a Hugging Face checkpoint
directory, a training workdir, or a preset with random weights (benchmarks).

    config, params = load_model(source, dtype="bfloat16", mesh=mesh)
    tokenizer = load_tokenizer(source)             # the source's own, or tokenizer='ascii' / a .model path
    template = load_chat_template(source, tokenizer)   # the chat template it was fine-tuned with

eval.py, generate.py, the lm-eval adapter and the benchmarks all load through here, so the same source and
dtypes give the same model everywhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp

from hymba_jax.config import HymbaConfig, get_preset
from hymba_jax.hf import CONFIG, FP32_TENSORS, load_hf_checkpoint
from hymba_jax.model import param_shardings
from hymba_jax.parallel import DEFAULT_AXIS_RULES, AxisRules

PRESET = "preset:"


def _kind(source: str) -> str:
    """'preset', 'hf' (a directory with config.json) or 'workdir' (any other directory)."""
    if source.startswith(PRESET):
        return "preset"
    path = Path(source)
    if (path / CONFIG).is_file():
        return "hf"
    if path.is_dir():
        return "workdir"
    raise FileNotFoundError(f"checkpoint {source!r} is not a directory; pass a Hugging Face checkpoint "
                            "directory (with config.json), a training workdir, or preset:NAME")


def load_model(source: str, dtype: Optional[str] = None, *, param_dtype: str = "float32",
               mesh: Optional[jax.sharding.Mesh] = None, rules: AxisRules = DEFAULT_AXIS_RULES, seed: int = 0,
               **overrides) -> tuple[HymbaConfig, Any]:
    """(config, params) for forward passes: the config has no rematerialisation.

    source: 'preset:NAME' (random weights of a HymbaConfig preset from `seed`, e.g. preset:hymba_1p5b); a
    directory with config.json (a Hugging Face checkpoint); any other directory (the latest checkpoint of a
    training workdir).
    dtype: the compute dtype; None keeps the source's (as trained for a workdir, else float32).
    param_dtype: the parameters' dtype (A_log stays fp32). Evaluation keeps fp32 weights, as training's
    validation does; generation stores them in its compute dtype, since decoding reads every weight per
    token.
    mesh: place the parameters on it, sharded by the logical axis `rules` (each process then holds only its
    devices' pieces); None: the default device.
    overrides: other HymbaConfig fields that do not change the layout (scan_backend, attention_backend).
    """
    kind = _kind(source)
    shardings = None
    if mesh is not None:
        shardings = lambda c: param_shardings(c, mesh, rules)
    if kind == "preset":
        from hymba_jax.model import init_params

        config = get_preset(source[len(PRESET):], param_dtype=param_dtype)
        params = init_params(config, jax.random.key(seed), shardings=None if mesh is None else shardings(config))
    elif kind == "hf":
        config, params = load_hf_checkpoint(source, jnp.dtype(param_dtype), shardings=shardings)
    else:
        from hymba_jax.checkpoint import restore_checkpoint_params

        step, config, params = restore_checkpoint_params(source, mesh=mesh, rules=rules)
        if jax.process_index() == 0:      # an earlier step than the latest when that one is damaged
            print(f"loaded {source} at checkpoint step {step}", file=sys.stderr)
        keep = lambda p, x: x if p[-1].key in FP32_TENSORS else x.astype(param_dtype)
        params = jax.tree_util.tree_map_with_path(keep, params)
        config = config.replace(param_dtype=param_dtype)
    return config.replace(dtype=dtype or config.dtype, remat="none", **overrides), params


def load_tokenizer(source: str, tokenizer: str = ""):
    """The tokenizer for `source` (as in load_model): `tokenizer` 'ascii' (AsciiTokenizer, for the tiny test
    models) or a SentencePiece .model path; '' the source's own: tokenizer.model in a Hugging Face
    checkpoint directory, the training data's tokenizer for a workdir (its file, or the one trained on the
    default corpus, from the cache). Errors say what to pass."""
    from hymba_jax.downstream.tokenizer import AsciiTokenizer

    if tokenizer == "ascii":
        return AsciiTokenizer()
    from hymba_jax.data.tokenizer import Tokenizer

    if tokenizer:
        if not Path(tokenizer).is_file():
            raise FileNotFoundError(f"tokenizer {tokenizer!r}: no such file; pass a SentencePiece .model path "
                                    "or 'ascii'")
        return Tokenizer.from_file(tokenizer)
    kind = _kind(source)
    if kind == "workdir":
        from hymba_jax.data import load_tokenizer as load_data_tokenizer
        from hymba_jax.checkpoint import read_workdir_config

        return load_data_tokenizer(read_workdir_config(source).data)
    path = Path(source) / "tokenizer.model"
    if kind == "hf" and path.is_file():
        return Tokenizer.from_file(path)
    raise ValueError(f"no tokenizer given and {source!r} has none (no tokenizer.model there): pass "
                     "tokenizer=/path/to/tokenizer.model, or 'ascii' (printable-ASCII characters, for test models)")


def load_chat_template(source: str, tokenizer, template: str = ""):
    """The chat template (hymba_jax.data.chat.ChatTemplate) to talk to `source` with: `template` ('default',
    a .jinja file, a tokenizer_config.json or its directory) when given; else a Hugging Face checkpoint's
    tokenizer_config.json `chat_template`, a workdir's training template (its data.chat_template, resolved as
    in training), or the default template."""
    from hymba_jax.data import chat, default_data_config

    data = default_data_config()
    kind = _kind(source)
    if template:
        data.chat_template = template
    elif kind == "workdir":
        from hymba_jax.checkpoint import read_workdir_config

        trained = read_workdir_config(source).data
        data.tokenizer, data.chat_template = trained.tokenizer, trained.get("chat_template", "")
    else:
        config_file = Path(source) / "tokenizer_config.json"
        has_template = kind == "hf" and config_file.is_file() and "chat_template" in json.loads(config_file.read_text())
        data.chat_template = str(config_file) if has_template else "default"
    return chat.load_template(data, tokenizer)
