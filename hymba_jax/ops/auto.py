"""The `auto` kernels: which scan and attention backend a platform runs when the config says "auto".

`HymbaConfig.scan_backend` and `attention_backend` default to "auto", so a shipped config is fast on the
machine it runs on without naming a kernel; an explicit name always wins. The choice depends only on the
platform ("cpu", "gpu", "tpu") and the compute dtype:

| platform | scan | attention |
|---|---|---|
| gpu | `pallas_gpu` (fused Triton kernel; 3.8x `associative` forward+backward on the H200) | `pallas_flash` for bf16/fp16 compute (Triton kernels that skip the masked tiles; 2.2-4.0x dense cuDNN per layer on the H200), `xla` otherwise (the kernels are built and measured for 16-bit inputs) |
| tpu | `pallas_tpu` (fused Mosaic kernel) | `splash` (Pallas splash attention, skips the tiles outside the causal or window band) |
| cpu | `sequential` (measured fastest on the CPU, docs/performance.md) | `xla` |

The fused scan kernels compute in fp32, so float64 checks keep the plain-JAX `associative` scan on every
platform. Programs resolve the choice once at start-up (`resolve_kernels`) and report it; a library user
who builds a model from an "auto" config gets the same choice for the platform JAX runs on when the model
is traced.
"""

from __future__ import annotations

from typing import Optional

import jax

from hymba_jax.config import HymbaConfig
from hymba_jax.ops.attention import ATTENTION_BACKENDS
from hymba_jax.ops.scan import available_backends

AUTO = "auto"
PLATFORMS = ("cpu", "gpu", "tpu")
_SCAN = {"cpu": "sequential", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}
_FUSED_SCAN_DTYPES = ("float32", "bfloat16", "float16")
_GPU_KERNEL_DTYPES = ("bfloat16", "float16")


def default_platform() -> str:
    """The platform of JAX's default backend: "cpu", "gpu" (CUDA or ROCm) or "tpu"."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def scan_backend(name: str, dtype: str, platform: Optional[str] = None) -> str:
    """`name` itself, or for "auto" the scan backend of `platform` (default: JAX's) for `dtype` compute."""
    if name != AUTO:
        return name
    platform = platform or default_platform()
    if dtype not in _FUSED_SCAN_DTYPES:
        return "associative"
    return _SCAN.get(platform, "associative")


def attention_backend(name: str, dtype: str, platform: Optional[str] = None) -> str:
    """`name` itself, or for "auto" the attention backend of `platform` (default: JAX's) for `dtype`."""
    if name != AUTO:
        return name
    platform = platform or default_platform()
    if platform == "tpu":
        return "splash"
    return "pallas_flash" if platform == "gpu" and dtype in _GPU_KERNEL_DTYPES else "xla"


def resolve_kernels(config: HymbaConfig, platform: Optional[str] = None) -> HymbaConfig:
    """`config` with "auto" backends replaced by the concrete kernels for `platform` (default: the platform
    JAX runs on; "tpu" when compiling ahead of time for a TPU topology)."""
    return config.replace(scan_backend=scan_backend(config.scan_backend, config.dtype, platform),
                          attention_backend=attention_backend(config.attention_backend, config.dtype, platform))


def check_backend_names(scan: str, attention: str) -> Optional[str]:
    """None if both names are known, else the message naming the bad field and the choices."""
    scans = (AUTO,) + available_backends()
    if scan not in scans:
        return f"scan_backend: unknown scan backend {scan!r}; choose one of {scans}"
    attentions = (AUTO,) + ATTENTION_BACKENDS
    if attention not in attentions:
        return f"attention_backend: unknown attention backend {attention!r}; choose one of {attentions}"
    return None


def describe(config: HymbaConfig, requested: HymbaConfig, platform: Optional[str] = None) -> str:
    """One line naming the kernels `config` runs and whether each was chosen automatically."""
    how = lambda field: "auto" if getattr(requested, field) == AUTO else "set"
    return (f"kernels on {platform or default_platform()}: scan {config.scan_backend} ({how('scan_backend')}), "
            f"attention {config.attention_backend} ({how('attention_backend')})")
