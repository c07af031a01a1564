"""The one place that knows the Hugging Face layout of released Hymba checkpoints.

    config, params = load_hf_checkpoint(path, dtype=jnp.float32)
    save_hf_checkpoint(path, config, params, dtype=jnp.bfloat16)

A checkpoint directory holds `config.json` and `model.safetensors`, or shards listed in
`model.safetensors.index.json`. PyTorch Linear weights are (out, in); ours are (in, out) with head axes
split out. The fused `mamba.in_proj` rows [q | k | v | x | z] (consumers: [q | x | z]) become separate
q/k/v kernels and one (d, 2, d_inner) x/z kernel, so each can be sharded along its own heads or channels.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

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
    `config_overrides` set non-layout fields such as `dtype` (compute) or `scan_backend`.

    `shardings(config)` -> a tree of `jax.sharding.Sharding` like the parameters (e.g.
    `lambda c: hymba_jax.train.state.param_shardings(c, mesh, rules)`): each parameter is then built with
    `jax.make_array_from_callback` as soon as its released tensor is read, and every process keeps only
    the pieces its own devices hold. The host holds one released tensor at a time (the largest is the
    embedding), never the whole model. Without it, the parameters land on the default device.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass the checkpoint directory (config.json and "
                              "safetensors files)")
    dtype_name = jnp.dtype(dtype).name
    config = HymbaConfig.load_hf_config(path / "config.json", param_dtype=dtype_name, **config_overrides)
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
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Write params in the released layout: config.json plus model.safetensors, or shards with an index
    when larger than max_shard_bytes. Tensors in `dtype` (bf16 or fp32), A_log in fp32.

    Files are written to a temporary directory beside `path` and moved in, so an interrupted export never
    leaves a half-written checkpoint under `path`.
    """
    path = Path(path)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}.get(jnp.dtype(dtype).name)
    if np_dtype is None:
        raise ValueError(f"save_hf_checkpoint: dtype must be bfloat16 or float32, got {jnp.dtype(dtype).name}")
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
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = jnp.dtype(dtype).name
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
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
    for stale in [*path.glob("model*.safetensors"), path / SAFETENSORS_INDEX]:
        stale.unlink(missing_ok=True)
    for file in tmp.iterdir():
        os.replace(file, path / file.name)
    tmp.rmdir()
