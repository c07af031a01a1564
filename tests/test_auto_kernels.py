"""The "auto" choices: kernels per platform and dtype (hymba_jax.ops.auto), explicit names winning, bad
names refused at validation with the key named; remat "auto" (the fastest step that fits the device)."""

from __future__ import annotations

import types

import jax
import pytest

from hymba_jax.config import ConfigError, HymbaConfig, hymba_1p5b, hymba_tiny
from hymba_jax.ops import auto
from hymba_jax.train.config import TrainConfigError, validate_config
from hymba_jax.train.step import StepDoesNotFit, compile_fitting
from train_testing import apply_overrides


@pytest.mark.parametrize("platform, dtype, scan, attention", [
    ("gpu", "bfloat16", "pallas_gpu", "pallas_flash"),
    ("gpu", "float16", "pallas_gpu", "pallas_flash"),
    ("gpu", "float32", "pallas_gpu", "xla"),       # cuDNN's flash attention has no fp32
    ("gpu", "float64", "associative", "xla"),      # the fused scans compute in fp32
    ("tpu", "bfloat16", "pallas_tpu", "splash"),
    ("tpu", "float32", "pallas_tpu", "splash"),
    ("cpu", "float32", "sequential", "xla"),
    ("cpu", "bfloat16", "sequential", "xla"),
])
def test_auto_resolves_per_platform(platform, dtype, scan, attention):
    config = hymba_tiny(dtype=dtype)
    assert (config.scan_backend, config.attention_backend) == ("auto", "auto")     # the defaults
    resolved = auto.resolve_kernels(config, platform)
    assert (resolved.scan_backend, resolved.attention_backend) == (scan, attention)
    assert resolved.replace(scan_backend="auto", attention_backend="auto") == config


def test_auto_uses_the_platform_jax_runs_on(monkeypatch):
    monkeypatch.setattr(auto.jax, "default_backend", lambda: "cuda")
    assert auto.default_platform() == "gpu"
    resolved = auto.resolve_kernels(hymba_1p5b(dtype="bfloat16"))
    assert (resolved.scan_backend, resolved.attention_backend) == ("pallas_gpu", "pallas_flash")
    monkeypatch.setattr(auto.jax, "default_backend", lambda: "tpu")
    assert auto.resolve_kernels(hymba_1p5b(dtype="bfloat16")).scan_backend == "pallas_tpu"
    line = auto.describe(auto.resolve_kernels(hymba_1p5b(attention_backend="xla")), hymba_1p5b(attention_backend="xla"))
    assert line == "kernels on tpu: scan pallas_tpu (auto), attention xla (set)"


@pytest.mark.parametrize("platform", auto.PLATFORMS)
def test_explicit_names_win(platform):
    config = hymba_tiny(dtype="bfloat16", scan_backend="chunked", attention_backend="xla")
    assert auto.resolve_kernels(config, platform) == config


@pytest.mark.parametrize("field, value", [("scan_backend", "palas_gpu"), ("attention_backend", "flash")])
def test_unknown_backend_names_are_refused_with_the_choices(field, value):
    with pytest.raises(ConfigError, match=rf"HymbaConfig\.{field}: .*{value!r}.*choose one of"):
        HymbaConfig(**{field: value})


@pytest.mark.parametrize("field", ["scan_backend", "attention_backend"])
def test_train_config_names_the_backend_key(field):
    from configs.tiny import get_config

    config = apply_overrides(get_config(), {f"model.{field}": "nope"})
    with pytest.raises(TrainConfigError, match=rf"model\.{field}: unknown .* 'nope'"):
        validate_config(config, num_devices=1)


class _Step:
    """A stand-in for a jitted train step: compiling needs `bytes_by_remat[remat]` per device, or fails
    like XLA:TPU when the value is None."""

    def __init__(self, config, bytes_by_remat):
        self.config, self.bytes = config, bytes_by_remat

    def lower(self, *args):
        return self

    def compile(self):
        need = self.bytes[self.config.remat]
        if need is None:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
        memory = types.SimpleNamespace(argument_size_in_bytes=need, output_size_in_bytes=0,
                                       alias_size_in_bytes=0, temp_size_in_bytes=0, generated_code_size_in_bytes=0)
        return types.SimpleNamespace(memory_analysis=lambda: memory, remat=self.config.remat)


@pytest.mark.parametrize("bytes_by_remat, limit, chosen", [
    ({"none": 90, "full": 50}, 100, "none"),        # fits: the fastest
    ({"none": 150, "full": 50}, 100, "full"),       # too big for the device: full remat
    ({"none": None, "full": 50}, 100, "full"),      # the compiler itself ran out of device memory
    ({"none": 150, "full": 50}, None, "none"),      # no limit known (the CPU)
])
def test_remat_auto_picks_the_fastest_step_that_fits(bytes_by_remat, limit, chosen):
    config = hymba_tiny(remat="auto")
    compiled, used, notes = compile_fitting(lambda c: _Step(c, bytes_by_remat), config, (), limit)
    assert compiled.remat == used.remat == chosen and used.replace(remat="auto") == config
    assert notes[-1].startswith(f"train step (remat {chosen})") and len(notes) == (1 if chosen == "none" else 2)


def test_explicit_remat_is_compiled_as_it_is():
    with pytest.raises(StepDoesNotFit, match="remat none does not fit in device memory .*Ran out of memory"):
        compile_fitting(lambda c: _Step(c, {"none": None}), hymba_tiny(remat="none"), (), 100)
    compiled, used, _ = compile_fitting(lambda c: _Step(c, {"full": 500}), hymba_tiny(remat="full"), (), 100)
    assert used.remat == "full"
