"""The one place that knows the Hugging Face layout of released Hymba checkpoints.

    config, params = load_hf_checkpoint(path, dtype=jnp.float32)
    save_hf_checkpoint(path, config, params, dtype=jnp.bfloat16, tokenizer="tokenizer.model")

A checkpoint directory holds `config.json` (read and written here: `from_hf_config` / `to_hf_config`) and
`model.safetensors`, or shards listed in `model.safetensors.index.json`; an export also carries
`generation_config.json` and, when a tokenizer is given, its files, so the released PyTorch code loads it
as it is (docs/checkpoints.md). PyTorch Linear weights are (out, in); ours are (in, out) with head axes
split out. The fused `mamba.in_proj` rows [q | k | v | x | z] (consumers: [q | x | z]) become separate
q/k/v kernels and one (d, 2, d_inner) x/z kernel, so each can be sharded along its own heads or channels.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from hymba_jax.config import ConfigError, HymbaConfig
from hymba_jax.model.lm import param_shapes

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FP32_TENSORS = ("A_log",)   # kept in fp32 whatever the export dtype, as in the released file


class CheckpointError(ValueError):
    """A checkpoint that does not fit its config: the message names the tensor and what was expected."""


# --------------------------------------------------------------------------------------------------
# Name and layout mapping. Each entry: HF name -> (path in our tree, ours -> HF, HF -> ours given our shape)

Transform = Callable[[np.ndarray], np.ndarray]


def _linear() -> tuple[Transform, Callable]:
    """PyTorch (out, in) <-> ours (in, *out_axes)."""
    return (lambda w: w.reshape(w.shape[0], -1).T,
            lambda t, shape: t.T.reshape(shape))


def _same() -> tuple[Transform, Callable]:
    return (lambda w: w, lambda t, shape: t.reshape(shape))


def _conv() -> tuple[Transform, Callable]:
    """(d_inner, 1, K) <-> ours (K, d_inner)."""
    return (lambda w: w.T[:, None, :], lambda t, shape: t[:, 0, :].T)


def _layer_map(cfg: HymbaConfig, i: int) -> dict[str, tuple[tuple[str, ...], Transform, Callable]]:
    """Every HF tensor of layer i except the fused in_proj (handled by _in_proj_parts)."""
    p, m = f"model.layers.{i}.", f"model.layers.{i}.mamba."
    layer = (f"layers_{i}",)
    entries = {
        p + "input_layernorm.weight": (layer + ("input_norm", "scale"), *_same()),
        p + "pre_moe_layernorm.weight": (layer + ("mlp_norm", "scale"), *_same()),
        p + "moe.experts.0.gate_proj.weight": (layer + ("mlp", "gate_proj", "kernel"), *_linear()),
        p + "moe.experts.0.up_proj.weight": (layer + ("mlp", "up_proj", "kernel"), *_linear()),
        p + "moe.experts.0.down_proj.weight": (layer + ("mlp", "down_proj", "kernel"), *_linear()),
        m + "out_proj.weight": (layer + ("out_proj", "kernel"), *_linear()),
        m + "pre_avg_layernorm1.weight": (layer + ("attn_out_norm", "scale"), *_same()),
        m + "pre_avg_layernorm2.weight": (layer + ("ssm_out_norm", "scale"), *_same()),
        m + "conv1d.weight": (layer + ("ssm", "conv_weight"), *_conv()),
        m + "x_proj.0.weight": (layer + ("ssm", "x_proj", "kernel"), *_linear()),
        m + "dt_proj.0.weight": (layer + ("ssm", "dt_proj", "kernel"), *_linear()),
        m + "dt_proj.0.bias": (layer + ("ssm", "dt_bias"), *_same()),
        m + "A_log.0": (layer + ("ssm", "A_log"), *_same()),
        m + "D.0": (layer + ("ssm", "D"), *_same()),
    }
    if cfg.conv_bias:
        entries[m + "conv1d.bias"] = (layer + ("ssm", "conv_bias"), *_same())
    if cfg.ssm_inner_norms:
        for hf_name, ours in (("dt_layernorm", "dt_norm"), ("B_layernorm", "B_norm"), ("C_layernorm", "C_norm")):
            entries[m + hf_name + ".weight"] = (layer + ("ssm", ours, "scale"), *_same())
    return entries


def _in_proj_parts(cfg: HymbaConfig, i: int) -> list[tuple[str, ...]]:
    """Our kernels stacked (in row order) into model.layers.i.mamba.in_proj.weight."""
    layer = (f"layers_{i}",)
    parts = [layer + ("attention", "q_proj", "kernel")]
    if cfg.owns_kv(i):
        parts += [layer + ("attention", "k_proj", "kernel"), layer + ("attention", "v_proj", "kernel")]
    return parts + [layer + ("ssm", "in_proj", "kernel")]


def _global_map(cfg: HymbaConfig) -> dict[str, tuple[tuple[str, ...], Transform, Callable]]:
    entries = {
        "model.embed_tokens.weight": (("embedding",), *_same()),
        "model.final_layernorm.weight": (("final_norm", "scale"), *_same()),
    }
    if cfg.num_meta_tokens:
        entries["model.memory_tokens"] = (("meta_tokens",), *_same())
    if not cfg.tie_word_embeddings:
        entries["lm_head.weight"] = (("lm_head",), *_linear())
    return entries


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _check_hybrid(config: HymbaConfig) -> None:
    if config.layer_kind != "hybrid":
        raise ConfigError(f"HymbaConfig.layer_kind={config.layer_kind!r}: the Hugging Face Hymba layout "
                          "holds hybrid layers only")


def to_hf_tensors(config: HymbaConfig, params: Mapping) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) in the released layout, for every tensor of `params` (lm_head.weight included as
    the tied copy, as the released state dict lists it)."""
    _check_hybrid(config)
    host = lambda path: np.asarray(jax.device_get(_get(params, path)))
    for name, (path, to_hf, _) in _global_map(config).items():
        yield name, to_hf(host(path))
    for i in range(config.num_layers):
        parts = [_linear()[0](host(path)) for path in _in_proj_parts(config, i)]
        yield f"model.layers.{i}.mamba.in_proj.weight", np.concatenate(parts, axis=0)
        for name, (path, to_hf, _) in _layer_map(config, i).items():
            yield name, to_hf(host(path))
    if config.tie_word_embeddings:
        yield "lm_head.weight", host(("embedding",))


def hf_tensor_shapes(config: HymbaConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the released layout for `config`, computed from the model (nothing allocated)."""
    shapes = param_shapes(config)
    zeros = jax.tree_util.tree_map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), shapes)
    return {name: tuple(t.shape) for name, t in to_hf_tensors(config, zeros)}


def _iter_from_hf_tensors(config: HymbaConfig, read: Callable[[str], np.ndarray]
                          ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(path in our tree, array) for every parameter, reading one released tensor at a time."""
    shapes = param_shapes(config)
    for name, (path, _, from_hf) in _global_map(config).items():
        yield path, from_hf(read(name), _get(shapes, path).shape)
    for i in range(config.num_layers):
        fused = read(f"model.layers.{i}.mamba.in_proj.weight")
        offset = 0
        for path in _in_proj_parts(config, i):
            shape = _get(shapes, path).shape
            rows = int(np.prod(shape[1:]))
            yield path, fused[offset:offset + rows].T.reshape(shape)
            offset += rows
        del fused
        for name, (path, _, from_hf) in _layer_map(config, i).items():
            yield path, from_hf(read(name), _get(shapes, path).shape)


# --------------------------------------------------------------------------------------------------
# The released config.json

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"

# Fields the released PyTorch code reads that have no counterpart in HymbaConfig, with the values of the
# released 1.5B file. `auto_map` names the released module files (configuration_hymba.py, modeling_hymba.py),
# which must sit beside the weights; `attn_implementation_new` picks its attention class (without it the
# released model falls back to 'sdpa', whose mask does not count the meta tokens, and its forward fails).
RELEASED_CODE_FIELDS = {
    "auto_map": {"AutoConfig": "configuration_hymba.HymbaConfig",
                 "AutoModelForCausalLM": "modeling_hymba.HymbaForCausalLM"},
    "attn_implementation": "flex",
    "attn_implementation_new": "flex",
    "calc_logits_for_entire_prompt": False,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "transformers_version": "4.44.0",
    "use_mamba_kernels": True,
}


def _check_released_code_builds(config: HymbaConfig) -> None:
    """Refuse, naming the field and the reason, a config the released PyTorch code cannot build.

    The released HymbaBlock sizes everything from hidden_size, num_heads, num_kv_heads and mamba_expand:
    query heads hidden_size / num_heads wide (kq_head_dim is used for keys only), K and V rows of in_proj
    int(num_kv_heads / num_heads * hidden_size [* mamba_expand]) in floating point, values
    d_inner / num_heads wide. An export that disagrees loads there with a size mismatch, or not at all.
    """
    _check_hybrid(config)
    hidden, heads, kv = config.hidden_size, config.num_heads, config.num_kv_heads
    if config.d_inner % hidden:
        raise ConfigError(f"HymbaConfig.d_inner: an export writes mamba_expand = d_inner / hidden_size as a "
                          f"whole number, and {config.d_inner} / {hidden} is not one")
    if config.qk_head_dim * heads != hidden:
        raise ConfigError(f"HymbaConfig.qk_head_dim={config.qk_head_dim}: the released PyTorch code cannot build "
                          f"it: its query heads are hidden_size / num_heads = {hidden} / {heads} wide whatever "
                          "kq_head_dim says, so it would not load this export; export only models with "
                          "qk_head_dim * num_heads == hidden_size")
    expand = config.d_inner // hidden
    released_rows = (int(kv / heads * hidden), int(kv / heads * hidden * expand))   # its arithmetic, exactly
    rows = (kv * config.qk_head_dim, kv * config.v_head_dim)
    if released_rows != rows:
        raise ConfigError(f"HymbaConfig.num_kv_heads={kv}: the released PyTorch code computes the K and V rows of "
                          f"in_proj in floating point as int(num_kv_heads / num_heads * hidden_size [* "
                          f"mamba_expand]) = {released_rows}, not this model's {rows} (num_heads={heads}), so it "
                          "would not load this export; choose num_heads and num_kv_heads whose ratio rounds exactly")


def to_hf_config(config: HymbaConfig, dtype=jnp.bfloat16) -> dict[str, Any]:
    """The released `config.json` for `config`: every field the released file has, lossless for every field
    the model uses, `torch_dtype` the dtype of the stored tensors. A config the released PyTorch code
    cannot build raises ConfigError saying why."""
    _check_released_code_builds(config)
    n = config.num_layers
    return {
        "architectures": ["HymbaForCausalLM"],
        "model_type": "hymba",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": n,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "kq_head_dim": -1,
        "v_head_dim": config.v_head_dim,
        "attn_hidden_size": -1,
        "intermediate_size": config.intermediate_size,
        "mamba_expand": config.d_inner // config.hidden_size,
        "mamba_d_state": config.d_state,
        "mamba_d_conv": config.d_conv,
        "mamba_dt_rank": config.dt_rank,
        "mamba_inner_layernorms": config.ssm_inner_norms,
        "mamba_conv_bias": config.conv_bias,
        "mamba_proj_bias": False,
        "conv_dim": {str(i): config.d_inner for i in range(n)},
        "num_memory_tokens": config.num_meta_tokens,
        "memory_tokens_interspersed_every": 0,
        "sliding_window": config.sliding_window,
        "global_attn_idx": list(config.global_layers),
        "kv_reuse_group": [list(g) for g in config.kv_reuse_groups],
        "kv_reuse_every_i_layer": -1,
        "kv_weight_reuse": False,
        "rope": True,
        "rope_type": config.rope_type,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "orig_max_position_embeddings": config.orig_max_position_embeddings,
        "seq_length": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "layer_type": ["h"] * n,
        "num_experts": 1,
        "num_experts_per_tok": 1,
        "num_mamba": 1,
        "kq_norm": "none",
        "hidden_act": "silu",
        "mlp_hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": False,
        "torch_dtype": jnp.dtype(dtype).name,
        **RELEASED_CODE_FIELDS,
    }


def from_hf_config(cfg: Mapping[str, Any], **overrides) -> HymbaConfig:
    """Read a released-style `config.json` dict. Unsupported features are refused by name."""

    def get(key: str, default: Any = KeyError):
        if key in cfg:
            return cfg[key]
        if default is KeyError:
            raise ConfigError(f"config.json: required field {key!r} is missing")
        return default

    archs = get("architectures", ["HymbaForCausalLM"])
    if "HymbaForCausalLM" not in archs or get("model_type", "hymba") != "hymba":
        raise ConfigError(f"config.json: architectures={archs!r}, model_type={cfg.get('model_type')!r}; "
                          "expected a Hymba checkpoint (HymbaForCausalLM, model_type 'hymba')")
    unsupported = {
        "num_experts": 1, "num_mamba": 1, "memory_tokens_interspersed_every": 0,
        "kv_weight_reuse": False, "kq_norm": "none", "mamba_proj_bias": False, "rope": True,
        "kv_reuse_every_i_layer": -1,
    }
    for key, supported in unsupported.items():
        if key in cfg and cfg[key] != supported:
            raise ConfigError(f"config.json: {key}={cfg[key]!r} is not supported by hymba-jax "
                              f"(the released Hymba models use {supported!r})")
    for act_key in ("hidden_act", "mlp_hidden_act"):
        if cfg.get(act_key, "silu") != "silu":
            raise ConfigError(f"config.json: {act_key}={cfg[act_key]!r}; only 'silu' is supported")
    layer_types = set(cfg.get("layer_type", ["h"]))
    if layer_types != {"h"}:
        raise ConfigError(f"config.json: layer_type {sorted(layer_types)} is not supported; "
                          "every released Hymba layer is hybrid ('h')")
    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    expand = get("mamba_expand", 2)
    d_inner = int(expand * hidden)
    if int(cfg.get("attn_hidden_size", -1)) not in (-1, d_inner):
        raise ConfigError(f"config.json: attn_hidden_size={cfg['attn_hidden_size']} is not supported "
                          f"(only -1, meaning the SSM width {d_inner})")
    kq = int(get("kq_head_dim", -1))
    qk_head_dim = hidden // heads if kq == -1 else kq
    v_head_dim = int(cfg.get("v_head_dim", d_inner // heads))
    n = int(get("num_hidden_layers"))
    conv_dim = cfg.get("conv_dim")
    if conv_dim:
        widths = {int(v) for v in (conv_dim.values() if isinstance(conv_dim, Mapping) else conv_dim)}
        if widths != {d_inner}:
            raise ConfigError(f"config.json: conv_dim {sorted(widths)} does not match "
                              f"mamba_expand * hidden_size = {d_inner}")
    dt_rank = get("mamba_dt_rank", "auto")
    if dt_rank == "auto":
        dt_rank = math.ceil(hidden / 16)
    fields = dict(
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        num_layers=n,
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads", heads)),
        qk_head_dim=qk_head_dim,
        v_head_dim=v_head_dim,
        intermediate_size=int(get("intermediate_size")),
        d_inner=d_inner,
        d_state=int(get("mamba_d_state")),
        d_conv=int(get("mamba_d_conv")),
        dt_rank=int(dt_rank),
        ssm_inner_norms=bool(get("mamba_inner_layernorms", True)),
        conv_bias=bool(get("mamba_conv_bias", True)),
        num_meta_tokens=int(get("num_memory_tokens", 0)),
        sliding_window=int(cfg.get("sliding_window") or get("max_position_embeddings")),
        global_layers=tuple(int(i) for i in get("global_attn_idx", list(range(n)))),
        kv_reuse_groups=tuple(tuple(int(i) for i in g) for g in (cfg.get("kv_reuse_group") or ())),
        rope_type=str(get("rope_type", "default")),
        rope_theta=float(get("rope_theta", 10000.0)),
        max_position_embeddings=int(get("max_position_embeddings")),
        orig_max_position_embeddings=int(cfg.get("orig_max_position_embeddings",
                                                  get("max_position_embeddings"))),
        rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(get("tie_word_embeddings", True)),
        bos_token_id=int(cfg.get("bos_token_id", 1)),
        eos_token_id=int(cfg.get("eos_token_id", 2)),
        pad_token_id=int(cfg.get("pad_token_id") or 0),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )
    fields.update(overrides)
    return HymbaConfig(**fields)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no {path.name} there; {what}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); fix or remove it") from None


def load_hf_config(path: str | os.PathLike, **overrides) -> HymbaConfig:
    """The HymbaConfig of a released-style config.json file, with HymbaConfig fields in `overrides`."""
    cfg = _read_json(Path(path), "a Hugging Face Hymba checkpoint directory holds config.json beside its "
                                 "safetensors files")
    return from_hf_config(cfg, **overrides)


# --------------------------------------------------------------------------------------------------
# Files

def _open(file: Path):
    """safe_open, with an error naming the file when it is not safetensors (garbage, or a truncated header)."""
    try:
        return safe_open(file, "numpy")
    except Exception as e:   # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{file}: cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                              "damaged or not a safetensors file") from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = path / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = {name: path / file for name, file in weight_map.items()}
        for file in set(files.values()):
            if not file.exists():
                raise CheckpointError(f"{index} lists {file.name}, which is not in {path}")
        return files
    single = path / SAFETENSORS
    if not single.exists():
        raise CheckpointError(f"{path}: neither {SAFETENSORS} nor {SAFETENSORS_INDEX} found; a Hugging Face "
                              "Hymba checkpoint directory holds one of them beside config.json")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def load_hf_checkpoint(path: str | os.PathLike, dtype=jnp.float32, *,
                       shardings: Callable[[HymbaConfig], Mapping] | None = None, **config_overrides
                       ) -> tuple[HymbaConfig, dict]:
    """Load a Hugging Face Hymba checkpoint directory into (config, params).

    Tensors may be fp32 or bf16; parameters are returned in `dtype` (A_log stays fp32). lm_head.weight may
    be present or absent when embeddings are tied (present, it must equal the embedding). A checkpoint that
    does not match its config (missing or extra tensor, wrong shape) raises CheckpointError naming it.
    `dtype` is the parameters' dtype, and so the returned config's `param_dtype`. `config_overrides` set
    HymbaConfig fields that do not change the layout, such as `scan_backend`, `attention_backend` or
    `remat`; the compute dtype is a field of the returned config (`config.replace(dtype="bfloat16")`), since
    the keyword `dtype` here is the parameters'.

    `shardings(config)` -> a tree of `jax.sharding.Sharding` like the parameters (e.g.
    `lambda c: hymba_jax.model.param_shardings(c, mesh, rules)`): each parameter is then built with
    `jax.make_array_from_callback` as soon as its released tensor is read, and every process keeps only
    the pieces its own devices hold. The host holds one released tensor at a time (the largest is the
    embedding), never the whole model. Without it, the parameters land on the default device.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the checkpoint directory (config.json and "
                              "safetensors files)")
    if "param_dtype" in config_overrides:
        raise TypeError(f"load_hf_checkpoint: param_dtype={config_overrides['param_dtype']!r}: pass the "
                        "parameters' dtype as `dtype`")
    dtype_name = jnp.dtype(dtype).name
    config = load_hf_config(path / CONFIG, param_dtype=dtype_name, **config_overrides)
    files = _tensor_files(path)
    expected = hf_tensor_shapes(config)

    def actual_shape(name: str) -> tuple[int, ...]:
        with _open(files[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    missing = [n for n in expected if n not in files and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]} is missing (expected shape {expected[missing[0]]})"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = sorted(set(files) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} for this config.json"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + "; the checkpoint and its config.json do not describe the same model")
    for name in files:
        if actual_shape(name) != expected[name]:
            raise CheckpointError(f"{path}: tensor {name} has shape {actual_shape(name)}, expected "
                                  f"{expected[name]} from config.json")

    handles: dict[Path, object] = {}

    def read(name: str) -> np.ndarray:
        """The tensor in fp32; a truncated file or a NaN/inf value raises CheckpointError naming both
        (NaN weights would otherwise make every logit NaN and generation return token 0)."""
        file = files[name]
        if file not in handles:
            handles[file] = _open(file).__enter__()
        try:
            tensor = handles[file].get_tensor(name).astype(np.float32)
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {name} cannot be read ({type(e).__name__}: {e}); the file is "
                                  "damaged or truncated") from None
        if not np.isfinite(tensor).all():
            raise CheckpointError(f"{file}: tensor {name} holds {int(np.sum(~np.isfinite(tensor)))} NaN or inf "
                                  "values; the checkpoint is damaged or was saved from a diverged run")
        return tensor

    targets = None if shardings is None else shardings(config)

    def place(tree_path: tuple[str, ...], array: np.ndarray) -> jax.Array:
        array = array.astype(jnp.dtype(jnp.float32 if tree_path[-1] in FP32_TENSORS else dtype))
        if targets is None:
            return jnp.asarray(array)
        return jax.make_array_from_callback(array.shape, _get(targets, tree_path), lambda index: array[index])

    check_tied_head = config.tie_word_embeddings and "lm_head.weight" in files
    params: dict = {}
    try:
        for tree_path, array in _iter_from_hf_tensors(config, read):
            if check_tied_head and tree_path == ("embedding",) and not np.array_equal(read("lm_head.weight"), array):
                raise CheckpointError(f"{path}: lm_head.weight differs from model.embed_tokens.weight but "
                                      "config.json ties them (tie_word_embeddings: true)")
            _set(params, tree_path, place(tree_path, array))
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    return config, params


def save_hf_checkpoint(path: str | os.PathLike, config: HymbaConfig, params: Mapping, dtype=jnp.bfloat16,
                       max_shard_bytes: int = 5 * 2**30, tokenizer: str | os.PathLike | None = None,
                       chat_template: str | None = None) -> None:
    """Write params in the released layout, as a directory the released PyTorch code loads as it is
    (`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` once the released
    configuration_hymba.py and modeling_hymba.py sit beside it; docs/checkpoints.md):

    * config.json: every field of the released file (`to_hf_config`); the fields of an existing
      config.json that it does not write are kept;
    * generation_config.json: the config's bos, eos and pad ids (the other fields of an existing one kept);
    * model.safetensors, or shards with an index when larger than max_shard_bytes: tensors in `dtype`
      (bf16 or fp32), A_log in fp32;
    * with `tokenizer`, its files: a directory's tokenizer files (e.g. a released checkpoint's) are copied
      as they are; a SentencePiece `.model` file becomes tokenizer.model with a tokenizer_config.json for
      it. They replace the tokenizer files in `path`; without `tokenizer`, those are kept;
    * with `chat_template` (a Jinja template, e.g. the one a model was fine-tuned with,
      hymba_jax/data/chat.py), it is the tokenizer_config.json's `chat_template`, which transformers'
      `apply_chat_template` and our generation's `--chat` use. It needs `tokenizer`.

    A config the released code cannot build is refused (ConfigError) before anything is written. Files are
    written to a temporary directory beside `path` and moved in, so an interrupted export never leaves a
    half-written checkpoint under `path`.
    """
    path = Path(path)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}.get(jnp.dtype(dtype).name)
    if np_dtype is None:
        raise ValueError(f"save_hf_checkpoint: dtype must be bfloat16 or float32, got {jnp.dtype(dtype).name}")
    hf_config = to_hf_config(config, dtype)
    if chat_template is not None and tokenizer is None:
        raise ValueError("save_hf_checkpoint: chat_template is written into tokenizer_config.json; pass the "
                         "tokenizer too (tokenizer=DIR or a .model file)")
    tokenizer_files = None if tokenizer is None else _tokenizer_files(Path(tokenizer), config)
    if chat_template is not None:
        tokenizer_config = json.loads(tokenizer_files.get("tokenizer_config.json", b"{}"))
        tokenizer_config["chat_template"] = chat_template
        tokenizer_files["tokenizer_config.json"] = json.dumps(tokenizer_config, indent=2).encode()
    existing = lambda name: _read_json(path / name, "") if (path / name).is_file() else {}
    generation_config = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                         "pad_token_id": config.pad_token_id,
                         "transformers_version": RELEASED_CODE_FIELDS["transformers_version"]}
    json_files = {CONFIG: {**existing(CONFIG), **hf_config},
                  GENERATION_CONFIG: {**existing(GENERATION_CONFIG), **generation_config}}

    tensors = {name: np.ascontiguousarray(t.astype(np.float32 if name.split(".")[-2] == "A_log" else np_dtype))
               for name, t in to_hf_tensors(config, params)}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, t in tensors.items():
        if size and size + t.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    for name, content in json_files.items():
        (tmp / name).write_text(json.dumps(content, indent=2))
    for name, content in (tokenizer_files or {}).items():
        (tmp / name).write_bytes(content)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], tmp / SAFETENSORS, metadata=metadata)
    else:
        weight_map = {}
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / file, metadata=metadata)
            weight_map.update({name: file for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        (tmp / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    path.mkdir(exist_ok=True)
    stale = [*path.glob("model*.safetensors"), path / SAFETENSORS_INDEX]
    if tokenizer_files is not None:
        stale += [path / name for name in TOKENIZER_FILES]
    for file in stale:
        file.unlink(missing_ok=True)
    for file in tmp.iterdir():
        os.replace(file, path / file.name)
    tmp.rmdir()


# --------------------------------------------------------------------------------------------------
# Tokenizer files

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def _tokenizer_files(source: Path, config: HymbaConfig) -> dict[str, bytes]:
    """File name -> content of the tokenizer files an export of `config` carries, from `source`: a directory
    holding Hugging Face tokenizer files (copied as they are) or a SentencePiece `.model` file (copied as
    tokenizer.model, with a tokenizer_config.json like the released one: LlamaTokenizer, BOS added, EOS
    not, Hymba's [PAD] appended after the last piece when the model has no pad piece)."""
    if source.is_dir():
        files = {name: (source / name).read_bytes() for name in TOKENIZER_FILES if (source / name).is_file()}
        if "tokenizer.model" not in files and "tokenizer.json" not in files:
            raise CheckpointError(f"tokenizer {source}: holds neither tokenizer.model nor tokenizer.json; pass "
                                  "a directory of Hugging Face tokenizer files or a SentencePiece .model file")
        return files
    if not source.is_file():
        raise CheckpointError(f"tokenizer {source}: no such file or directory; pass a directory of Hugging Face "
                              "tokenizer files or a SentencePiece .model file")
    from hymba_jax.data.tokenizer import Tokenizer

    model_proto = source.read_bytes()
    tok = Tokenizer(model_proto)
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"tokenizer {source}: its {tok.vocab_size} ids do not fit the model's vocab_size "
                          f"{config.vocab_size}; export the tokenizer the model was trained with")
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": tok.piece(tok.bos_id),
        "eos_token": tok.piece(tok.eos_id),
        "unk_token": tok.piece(tok.unk_id),
        "pad_token": tok.piece(tok.pad_id),
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
        "sp_model_kwargs": {},
    }
    if tok.pad_id == tok.piece_count:
        tokenizer_config["added_tokens_decoder"] = {str(tok.pad_id): {
            "content": tok.piece(tok.pad_id), "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}}
    return {"tokenizer.model": model_proto, "tokenizer_config.json": json.dumps(tokenizer_config, indent=2).encode()}
