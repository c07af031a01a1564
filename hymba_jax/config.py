"""HymbaConfig: the one description of a Hymba model, and its presets.

Every variant of the architecture (see the architecture document) is a configuration of the same code:
the released 1.5B model, the paper's smaller sizes, the attention-only and SSM-only ablations and a
Llama-style attention-only baseline. The released `config.json` is read and written by hymba_jax.hf.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

LayerKind = Literal["hybrid", "attention", "ssm"]
ATTENTION_KINDS = ("hybrid", "attention")
SSM_KINDS = ("hybrid", "ssm")


class ConfigError(ValueError):
    """A configuration that cannot describe a Hymba model (the message names the field)."""


@dataclasses.dataclass(frozen=True)
class HymbaConfig:
    """Shape and numerics of a Hymba model.

    Layer roles follow the released model: `global_layers` use full causal attention, every other layer a
    sliding window of `sliding_window` positions (meta tokens always visible). In each tuple of
    `kv_reuse_groups` the first layer computes K/V and the following layers reuse them.
    """

    vocab_size: int = 32001
    hidden_size: int = 1600
    num_layers: int = 32
    num_heads: int = 25
    num_kv_heads: int = 5
    qk_head_dim: int = 64
    v_head_dim: int = 128
    intermediate_size: int = 5504
    d_inner: int = 3200
    d_state: int = 16
    d_conv: int = 4
    dt_rank: int = 100
    ssm_inner_norms: bool = True
    conv_bias: bool = True
    num_meta_tokens: int = 128
    sliding_window: int = 1024
    global_layers: tuple[int, ...] = (0, 15, 31)
    kv_reuse_groups: tuple[tuple[int, ...], ...] = (
        (1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14),
        (16, 17, 18), (19, 20), (21, 22), (23, 24), (25, 26), (27, 28), (29, 30),
    )
    rope_type: Literal["default", "ntk"] = "ntk"
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    orig_max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    layer_kind: LayerKind = "hybrid"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02
    # Numerics and kernels (not part of the released config.json).
    dtype: str = "float32"          # compute dtype: activations and matmul inputs
    param_dtype: str = "float32"    # parameter storage
    scan_backend: str = "auto"       # "auto": the platform's fastest (hymba_jax.ops.auto), or a backend name
    attention_backend: str = "auto"  # "auto" | "xla" (reference) | "cudnn" | "splash" | "cudnn_skip" |
    #                                  "pallas_flash" (hymba_jax.ops.attention)
    remat: str = "none"              # "none" | "full" | "dots" | "auto": rematerialisation of each layer
    scan_layers: bool = True         # compile each repeated run of layers once (hymba_jax.model.lm)
    one_layer_body: bool = True      # with scan_layers, one compiled layer for every kind where the attention
    #                                  backend allows (`uses_one_layer_body`); False: one per kind, steps ~4%
    #                                  faster, the first compile ~35 s longer (1.5B, H200: docs/performance.md)

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------------------------------------
    # Derived structure
    @property
    def has_attention(self) -> bool:
        return self.layer_kind in ATTENTION_KINDS

    @property
    def has_ssm(self) -> bool:
        return self.layer_kind in SSM_KINDS

    @property
    def attn_out_dim(self) -> int:
        """Width of the attention branch output (heads * v_head_dim)."""
        return self.num_heads * self.v_head_dim

    @property
    def branch_dim(self) -> int:
        """Width of the fused branch output fed to out_proj."""
        return self.d_inner if self.has_ssm else self.attn_out_dim

    def kv_producer(self, layer: int) -> int:
        """The layer whose K/V `layer` uses (itself unless it is a consumer in a KV-sharing group)."""
        for group in self.kv_reuse_groups:
            if layer in group[1:]:
                return group[0]
        return layer

    def owns_kv(self, layer: int) -> bool:
        return self.kv_producer(layer) == layer

    def is_global(self, layer: int) -> bool:
        return layer in self.global_layers

    def attention_window(self, layer: int) -> Optional[int]:
        """How far back a query of `layer` sees: None in global layers (every earlier position), else
        `sliding_window` positions. The one rule for the model's masks, the decode cache and FLOP counts."""
        return None if self.is_global(layer) else self.sliding_window

    @property
    def kv_owner_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if self.owns_kv(i))

    @property
    def rope_base(self) -> float:
        """RoPE base; static NTK scaling as the released model computes it."""
        if self.rope_type == "default":
            return float(self.rope_theta)
        hd = self.qk_head_dim
        scale = 2 * self.max_position_embeddings / self.orig_max_position_embeddings - 1
        return float(self.rope_theta * scale ** (hd / (hd - 2)))

    def replace(self, **changes) -> "HymbaConfig":
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ConfigError(f"HymbaConfig.{field}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "intermediate_size"):
            need(int(getattr(self, name)) > 0, name, f"must be a positive integer, got {getattr(self, name)!r}")
        need(self.layer_kind in ("hybrid", "attention", "ssm"), "layer_kind",
             f"must be 'hybrid', 'attention' or 'ssm', got {self.layer_kind!r}")
        need(self.num_meta_tokens >= 0, "num_meta_tokens", f"must be >= 0, got {self.num_meta_tokens}")
        if self.has_attention:
            need(self.num_heads > 0 and self.num_kv_heads > 0, "num_heads",
                 f"heads ({self.num_heads}) and kv heads ({self.num_kv_heads}) must be positive")
            need(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                 f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
            need(self.qk_head_dim > 0 and self.qk_head_dim % 2 == 0, "qk_head_dim",
                 f"must be a positive even number (RoPE rotates pairs), got {self.qk_head_dim}")
            need(self.v_head_dim > 0, "v_head_dim", f"must be positive, got {self.v_head_dim}")
            need(self.sliding_window > 0, "sliding_window", f"must be positive, got {self.sliding_window}")
            need(self.rope_type in ("default", "ntk"), "rope_type",
                 f"must be 'default' or 'ntk', got {self.rope_type!r}")
        if self.has_ssm:
            for name in ("d_inner", "d_state", "d_conv", "dt_rank"):
                need(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        if self.layer_kind == "hybrid":
            need(self.attn_out_dim == self.d_inner, "v_head_dim",
                 f"num_heads * v_head_dim ({self.num_heads} * {self.v_head_dim} = {self.attn_out_dim}) must "
                 f"equal d_inner ({self.d_inner}) so the attention and SSM outputs can be averaged")
        for i in self.global_layers:
            need(0 <= i < self.num_layers, "global_layers", f"layer {i} is not in 0..{self.num_layers - 1}")
        seen: set[int] = set()
        for group in self.kv_reuse_groups:
            need(len(group) >= 2, "kv_reuse_groups", f"group {list(group)} needs at least two layers")
            for i in group:
                need(0 <= i < self.num_layers, "kv_reuse_groups",
                     f"layer {i} of group {list(group)} is not in 0..{self.num_layers - 1}")
                need(i not in seen, "kv_reuse_groups", f"layer {i} is in more than one group")
                need(i not in self.global_layers, "kv_reuse_groups",
                     f"layer {i} is global; a KV-sharing group may only hold sliding-window layers")
                seen.add(i)
            need(list(group) == sorted(group), "kv_reuse_groups",
                 f"group {list(group)} must list its layers in increasing order (the first one produces K/V)")
        need(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        need(self.dtype in ("float32", "bfloat16", "float16", "float64"), "dtype",
             f"must be one of float32, bfloat16, float16, float64, got {self.dtype!r}")
        need(self.param_dtype in ("float32", "bfloat16", "float64"), "param_dtype",
             f"must be one of float32, bfloat16, float64, got {self.param_dtype!r}")
        from hymba_jax.ops.auto import check_backend_names   # the kernel registries import jax

        bad_backend = check_backend_names(self.scan_backend, self.attention_backend)
        if bad_backend:
            raise ConfigError(f"HymbaConfig.{bad_backend}")
        need(self.remat in ("none", "full", "dots", "auto"), "remat",
             f"must be 'none', 'full', 'dots' or 'auto' (train.py: none if the step fits the device, else "
             f"full; a model built directly: none), got {self.remat!r}")


def _pair_groups(layers: list[int]) -> tuple[tuple[int, ...], ...]:
    """Consecutive sliding-window layers paired into KV-sharing groups, as in the 1.5B model."""
    groups, run = [], []
    for i in layers + [None]:
        if i is not None and (not run or i == run[-1] + 1):
            run.append(i)
            continue
        for k in range(0, len(run) - 1, 2):
            groups.append(tuple(run[k:k + 2]))
        run = [i] if i is not None else []
    return tuple(groups)


def paper_size(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, **overrides) -> HymbaConfig:
    """A paper-table model: 3 global layers (first, middle, last), window 1024, d_state 16, tied head,
    128 meta tokens and pairs of consecutive sliding-window layers sharing K/V."""
    global_layers = (0, layers // 2 - 1, layers - 1)
    local = [i for i in range(layers) if i not in global_layers]
    d_inner = 2 * hidden
    fields = dict(
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        qk_head_dim=hidden // heads, v_head_dim=d_inner // heads, intermediate_size=mlp, d_inner=d_inner,
        dt_rank=math.ceil(hidden / 16), global_layers=global_layers, kv_reuse_groups=_pair_groups(local),
    )
    fields.update(overrides)
    return HymbaConfig(**fields)


def hymba_1p5b(**overrides) -> HymbaConfig:
    """Exactly the released nvidia/Hymba-1.5B-Base configuration."""
    return HymbaConfig(**overrides)


def hymba_350m(**overrides) -> HymbaConfig:
    return paper_size(768, 32, 12, 4, 2432, **overrides)


def hymba_125m(**overrides) -> HymbaConfig:
    return paper_size(512, 24, 8, 4, 1664, **overrides)


def hymba_tiny(**overrides) -> HymbaConfig:
    """A tiny model with every feature on (the shape of the `hymba-tiny-a` fixture), for tests."""
    fields = dict(
        vocab_size=101, hidden_size=64, num_layers=7, num_heads=4, num_kv_heads=2, qk_head_dim=16,
        v_head_dim=32, intermediate_size=96, d_inner=128, d_state=4, d_conv=4, dt_rank=8,
        num_meta_tokens=4, sliding_window=8, global_layers=(0, 3, 6), kv_reuse_groups=((1, 2), (4, 5)),
        rope_type="ntk", max_position_embeddings=64, orig_max_position_embeddings=16,
    )
    fields.update(overrides)
    return HymbaConfig(**fields)


def llama_style(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, head_dim: int | None = None,
                **overrides) -> HymbaConfig:
    """An attention-only, all-global, no-meta-token baseline built by the same code (Llama-like)."""
    head_dim = head_dim or hidden // heads
    fields = dict(
        layer_kind="attention", hidden_size=hidden, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, qk_head_dim=head_dim, v_head_dim=head_dim, intermediate_size=mlp,
        d_inner=heads * head_dim, num_meta_tokens=0, global_layers=tuple(range(layers)), kv_reuse_groups=(),
        rope_type="default", rope_theta=500000.0, sliding_window=131072,
    )
    fields.update(overrides)
    return HymbaConfig(**fields)


def llama_3p2_3b_shape(**overrides) -> HymbaConfig:
    """Llama-3.2-3B's shape: 28 layers, 24 heads, 8 KV heads of 128, hidden 3072, MLP 8192."""
    return llama_style(3072, 28, 24, 8, 8192, head_dim=128, vocab_size=128256, **overrides)


PRESETS = {
    "hymba_1p5b": hymba_1p5b,
    "hymba_350m": hymba_350m,
    "hymba_125m": hymba_125m,
    "hymba_tiny": hymba_tiny,
    "llama_3p2_3b_shape": llama_3p2_3b_shape,
}


def get_preset(name: str, **overrides) -> HymbaConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)
