"""JAX's persistent compilation cache, on by default in train.py, eval.py and generation.

Compiling the Hymba-1.5B training step takes about a minute on a GPU host (docs/performance.md); with the
cache, a restart, a resume or a second run of the same program loads the compiled executable instead
(GPU autotuning results are kept beside it). The cache is keyed by the program, the devices and the
JAX/XLA versions, so a changed config or another machine simply compiles again.

`JAX_COMPILATION_CACHE_DIR` (JAX's own setting), when set, is used instead of the program's directory.
Only compilations over one second are stored (JAX's `jax_persistent_cache_min_compile_time_secs`).
The traced train step is kept beside the compiled programs, so a warm start skips tracing too
(`lower_cached`, below).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import jax
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding

DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "hymba_jax", "jax")


def enable(directory: str) -> Optional[str]:
    """Store and reuse compiled programs in `directory` ('' turns the cache off unless
    JAX_COMPILATION_CACHE_DIR is set). Call before the first compilation. Returns the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if current or not directory:
        return current or None
    path = os.path.abspath(os.path.expanduser(directory))
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()   # a compilation before this one may have found the cache off
    return path


# ---- Traced programs -------------------------------------------------------------------------------------
# The persistent cache skips XLA only: a warm start still traces the step in Python (14 s of the 1.5B's 34 s
# warm start on the H200, docs/performance.md). So the compile path (`train.step.compile_fitting`) keeps the
# traced and lowered step too, as a `jax.export` module in `<cache directory>/traced/`, and a later run with
# the same key deserializes it instead of tracing. Both runs compile the step through the deserialized
# module, so the compiled program is the same and the XLA cache hits on the warm run.

TRACED_SUBDIR = "traced"
# Custom calls of the kernels (Pallas Triton, cuDNN attention) that `jax.export` refuses by default because
# their format may change between jax versions; an entry is only ever read by the jax/jaxlib it was made with
# (the key), so they are safe here. Mosaic GPU and TPU kernels are allowed by jax.export itself.
KERNEL_CUSTOM_CALLS = ("__gpu$xla.gpu.triton",) + tuple(
    f"__cudnn$fmha{kind}{suffix}" for kind in ("Softmax", "ScaleBiasSoftmax", "SoftmaxDropout",
                                               "ScaleBiasSoftmaxDropout")
    for suffix in ("", "Backward")) + ("__cudnn$fmhaSoftmaxF8", "__cudnn$fmhaSoftmaxBackwardF8")
# Installed distributions whose version can change a traced program (jax and its plugins, the libraries
# the step is built from, cuDNN, libtpu).
_KEY_DISTRIBUTIONS = ("jax", "flax", "optax", "libtpu", "nvidia-cudnn")


@functools.lru_cache(maxsize=1)
def _environment_key() -> str:
    """The versions of the distributions that shape a traced program and a hash of this package's source."""
    versions = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                      if d.metadata["Name"] and d.metadata["Name"].lower().replace("_", "-").startswith(
                          _KEY_DISTRIBUTIONS))
    source = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        source.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return "\n".join([sys.version.split()[0], *versions, f"hymba_jax source {source.hexdigest()}"])


def program_key(name: str, args: tuple, mesh: Mesh, *settings: Any) -> str:
    """The cache key of a traced program: `name`, the `settings` that build it (the model config, the
    training settings; their repr), the arguments' tree, shapes, dtypes and shardings, the mesh and its
    devices, jax's configuration (x64, matmul precision, ...) and `_environment_key`."""
    leaves = jax.tree_util.tree_flatten_with_path(args)[0]
    arg_types = [(jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)),
                  repr(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else repr(x.sharding))
                 for path, x in leaves]
    device = mesh.devices.flat[0]
    parts = [name, *map(repr, settings), repr(jax.tree.structure(args)), repr(arg_types),
             repr((dict(mesh.shape), device.platform, device.device_kind, mesh.devices.size, jax.process_count())),
             repr(sorted((k, repr(v)) for k, v in jax.config.values.items())), _environment_key()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def lower_cached(jitted: Any, args: tuple, *, mesh: Mesh, key: str, directory: Optional[str]
                 ) -> tuple[jax.stages.Lowered, str]:
    """`jitted.lower(*args)` through the traced-program cache in `<directory>/traced` (None: no cache, it
    is `jitted.lower(*args)`): (lowered, how it was made for the logs: "traced", "traced and stored",
    "traced (not stored)", "traced (not cached)" or "loaded the traced program").

    jitted: a `jax.jit` function with in/out shardings on `mesh`; its donation is kept. key: `program_key`
    of everything that changes the program. A missing entry is traced, exported and stored; an entry that
    cannot be read (corrupt, another format) is ignored with a warning and replaced; one that cannot be
    written is only warned about. A step that cannot be exported (a custom call outside
    KERNEL_CUSTOM_CALLS, a jax that exports differently) is lowered as it is, uncached, with a warning.
    """
    if directory is None:
        return jitted.lower(*args), "traced"
    path = Path(directory) / TRACED_SUBDIR / f"{key}.exported"
    if path.exists():
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f)
            return _lower_exported(entry, args, mesh), "loaded the traced program"
        except Exception as e:   # whatever is wrong with an entry, tracing again is correct
            warnings.warn(f"traced program cache: ignoring {path} ({type(e).__name__}: {str(e)[:200]}); "
                          "tracing again")
    traced = jitted.trace(*args)        # a tracing error is the program's: it is raised
    try:
        entry = _export(jitted, traced, args)
        lowered = _lower_exported(entry, args, mesh)
    except Exception as e:              # the cache is only a shortcut: the traced step is lowered as it is
        warnings.warn(f"traced program cache: the step cannot be exported, so it is not cached "
                      f"({type(e).__name__}: {str(e)[:300]})")
        return traced.lower(), "traced (not cached)"
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")    # written whole, then renamed: never half
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            pickle.dump(entry, f)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"traced program cache: cannot write {path} ({e}); the next run traces again")
        tmp.unlink(missing_ok=True)
        return lowered, "traced (not stored)"
    return lowered, "traced and stored"


def _export(jitted: Any, traced: jax.stages.Traced, args: tuple) -> dict:
    """The cache entry of a traced step: its `jax.export` module serialized, its output tree and the
    arguments it donates (given again to the jit that calls the module, which must donate whole arguments).
    Raises ValueError for a custom call outside KERNEL_CUSTOM_CALLS or an argument donated in part."""
    donated = [[leaf.donated for leaf in jax.tree.leaves(arg)] for arg in traced.args_info[0]]
    if any(any(d) and not all(d) for d in donated):
        raise ValueError("an argument is donated in part")
    # The default backend's export platform ("cuda", not the devices' own name "gpu"): the programs that use
    # this cache run on the default backend's devices.
    exported = jax.export.export(jitted, platforms=(jax.export.default_export_platform(),), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(target) for target in KERNEL_CUSTOM_CALLS])(*args)
    # jax.export serializes only registered pytree node types (not the TrainState nor optax's states): the
    # module gets flat trees, and the entry keeps the output tree by pickle (the input tree is the args').
    flat_in = jax.tree.structure((tuple(exported.in_avals), {}))
    flat_out = jax.tree.structure(tuple(exported.out_avals))
    return {"exported": bytes(dataclasses.replace(exported, in_tree=flat_in, out_tree=flat_out).serialize()),
            "out_tree": exported.out_tree, "donate_argnums": tuple(i for i, d in enumerate(donated) if any(d))}


def _lower_exported(entry: dict, args: tuple, mesh: Mesh) -> jax.stages.Lowered:
    """Lower a call of the stored program for `args` with its shardings and donation: what a cold and a
    warm run both compile."""
    exported = jax.export.deserialize(bytearray(entry["exported"]))
    exported = dataclasses.replace(exported, in_tree=jax.tree.structure((args, {})), out_tree=entry["out_tree"])
    in_shardings = jax.tree.unflatten(jax.tree.structure(args), exported.in_shardings_jax(mesh))
    out_shardings = jax.tree.unflatten(exported.out_tree, exported.out_shardings_jax(mesh))

    def call(*call_args):
        return exported.call(*call_args)

    call.__name__ = call.__qualname__ = exported.fun_name     # the XLA cache's entry is named after the step
    return jax.jit(call, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=entry["donate_argnums"]).lower(*args)
