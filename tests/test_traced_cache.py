"""The traced-program cache beside the compilation cache (`compilation_cache.lower_cached`): a second build
of the train step loads the stored program instead of tracing it (counted, not timed), computes the same
bits, keeps the state's donation, and a corrupt entry is traced again with a warning."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from hymba_jax import compilation_cache
from hymba_jax.ops.auto import resolve_kernels
from hymba_jax.parallel import make_mesh
from hymba_jax.train import step as step_module
from hymba_jax.train.config import model_config
from hymba_jax.train.program import build_train_program

from train_testing import REPO, SMALL_MODEL, apply_overrides

sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def program():
    from configs.tiny import get_config

    config = apply_overrides(get_config(), {f"model.{k}": v for k, v in SMALL_MODEL.items()})
    config.seq_len, config.batch_size = 16, 2
    return build_train_program(config, resolve_kernels(model_config(config, 64)), make_mesh({"data": -1}))


def _batch(program):
    shape = (2, 16)
    ids = jnp.arange(32, dtype=jnp.int32).reshape(shape) % 64
    batch = {"inputs": ids, "targets": (ids + 1) % 64, "segment_ids": jnp.ones(shape, jnp.int32),
             "weights": jnp.ones(shape, jnp.float32)}
    return jax.device_put(batch, program.batch_sharding)


def test_second_build_loads_the_traced_step_same_bits_and_donation(program, tmp_path, monkeypatch):
    cfg = program.model_config
    state = jax.device_get(program.init_state(jax.random.key(0)))
    args = (program.abstract_state(), _batch(program))
    plain, _, _ = program.compile(cfg, args, None)
    key = compilation_cache.program_key("train_step", args, program.mesh, cfg, program.compile_settings())
    _, how = compilation_cache.lower_cached(program.train_step(cfg), args, mesh=program.mesh, key=key,
                                            directory=str(tmp_path))    # what program.compile does cold
    assert how == "traced and stored"
    assert [p.name for p in (tmp_path / compilation_cache.TRACED_SUBDIR).iterdir()] == [f"{key}.exported"]

    traces = []
    loss_sums = step_module.loss_sums
    monkeypatch.setattr(step_module, "loss_sums", lambda *a: traces.append(1) or loss_sums(*a))
    cached, _, notes = program.compile(cfg, args, None, str(tmp_path))
    assert "loaded the traced program" in notes[-1] and not traces      # nothing was traced

    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    plain_mem, cached_mem = plain.memory_analysis(), cached.memory_analysis()
    assert [getattr(cached_mem, f) for f in fields] == [getattr(plain_mem, f) for f in fields]
    assert cached_mem.alias_size_in_bytes > 0                              # the state is donated
    donated = lambda compiled: [(leaf.donated, leaf.shape) for leaf in jax.tree.leaves(compiled.args_info)]
    assert donated(cached) == donated(plain)                               # it alone

    results = []
    for compiled in (plain, cached):
        device_state = jax.device_put(state, program.state_shardings)
        batch = _batch(program)
        results.append(jax.device_get(compiled(device_state, batch)))
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(device_state.params))
        assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(batch))   # only the state is donated
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_key_follows_what_changes_the_program(program):
    args = (program.abstract_state(), program.abstract_batch(2, 16))
    cfg, mesh = program.model_config, program.mesh
    key = lambda a=args, c=cfg, s="settings": compilation_cache.program_key("train_step", a, mesh, c, s)
    assert key() == key()
    others = [key(c=cfg.replace(remat="full")), key(c=cfg.replace(hidden_size=64)), key(s="other settings"),
              key(a=(args[0], program.abstract_batch(2, 32))),
              key(a=(args[0], jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args[1])))]
    with jax.enable_x64(True):                                              # jax's configuration
        others.append(key())
    assert len({key(), *others}) == 1 + len(others)


def _small_step(mesh):
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.jit(lambda x, y: (x + y, jnp.sum(y)), in_shardings=(sharding, sharding),
                   out_shardings=(sharding, sharding), donate_argnums=0)


def test_a_corrupt_entry_is_traced_again_with_a_warning(tmp_path):
    mesh = make_mesh({"data": -1})
    args = (jnp.ones(4), jnp.arange(4.0))
    key = compilation_cache.program_key("small", args, mesh)
    lowered, how = compilation_cache.lower_cached(_small_step(mesh), args, mesh=mesh, key=key,
                                                  directory=str(tmp_path))
    assert how == "traced and stored"
    assert [leaf.donated for leaf in jax.tree.leaves(lowered.args_info)] == [True, False]
    entry = tmp_path / compilation_cache.TRACED_SUBDIR / f"{key}.exported"
    entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(UserWarning, match="ignoring .* tracing again"):
        lowered, how = compilation_cache.lower_cached(_small_step(mesh), args, mesh=mesh, key=key,
                                                      directory=str(tmp_path))
    assert how == "traced and stored"
    _, how = compilation_cache.lower_cached(_small_step(mesh), args, mesh=mesh, key=key, directory=str(tmp_path))
    assert how == "loaded the traced program"
    out = lowered.compile()(jnp.ones(4), jnp.arange(4.0))
    np.testing.assert_array_equal(out[0], 1 + np.arange(4.0))
