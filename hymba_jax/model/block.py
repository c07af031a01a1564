"""One Hymba layer: attention heads and SSM heads in parallel on the same input (the hybrid-head
module), their normalised outputs averaged and projected back, then a SwiGLU MLP."""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax

from hymba_jax.config import HymbaConfig
from hymba_jax.model.attention import KV, AttentionBranch, Mask
from hymba_jax.model.norms import RMSNorm
from hymba_jax.model.params import Dense, constrain
from hymba_jax.model.ssm import SSMBranch, SSMState


class LayerState(NamedTuple):
    """What a layer leaves for the positions after it: K/V (owners only) and the SSM state."""

    kv: Optional[KV]
    ssm: Optional[SSMState]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    config: HymbaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda features, axes, name: Dense(features, axes, cfg.param_dtype, cfg.initializer_range,
                                                  name=name)
        gate = dense((cfg.intermediate_size,), ("embed", "mlp"), "gate_proj")(x)
        up = dense((cfg.intermediate_size,), ("embed", "mlp"), "up_proj")(x)
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense((cfg.hidden_size,), ("mlp", "embed"), "down_proj")(hidden)


class HymbaLayer(nn.Module):
    config: HymbaConfig
    index: Optional[int]    # None: any layer of the one-body scan (its kind comes with its inputs)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: Mask, doc_pos: Optional[jax.Array],
                 prefix: Optional[LayerState], shared_kv: Optional[KV], lengths: Optional[jax.Array] = None,
                 owns_kv: Optional[jax.Array] = None) -> tuple[jax.Array, LayerState]:
        """x (B, T, d). positions (B|1, T) RoPE positions; mask (B|1, T, S_prefix + T) the attention mask
        for this layer's kind (or its `TextMask`); doc_pos (B, T) or None, positions inside packed documents
        (SSM and conv restart where it is 0); prefix: the state of the positions before x (the meta tokens),
        or None; shared_kv: the producer's K/V for x when this layer is a KV consumer; lengths (B,) or None: the
        number of real positions in each row of x (the rest is padding that leaves the SSM state unchanged).
        With `index` None, `owns_kv` (a bool scalar) says whether the layer uses its own K/V or shared_kv, and
        `mask` is the layer's (`layer_kind_mask`).

        Returns the layer output (B, T, d) and the state it leaves (its K/V if it owns them; with `index`
        None, the K/V it used).
        """
        cfg = self.config
        norm = lambda axis, name: RMSNorm(cfg.rms_norm_eps, axis, cfg.param_dtype, name=name)
        x = constrain(x, ("batch", "length", "embed"))
        u = norm("embed", "input_norm")(x)
        branches = []
        kv = ssm_state = None
        if cfg.has_attention:
            owns = None if self.index is None else cfg.owns_kv(self.index)
            attn, kv = AttentionBranch(cfg, owns, name="attention")(
                u, positions, mask, prefix.kv if prefix is not None else None, shared_kv, owns_kv)
            branches.append(norm("inner", "attn_out_norm")(attn))
            kv = None if owns is False else kv
        if cfg.has_ssm:
            ssm, ssm_state = SSMBranch(cfg, name="ssm")(u, prefix.ssm if prefix is not None else None, doc_pos,
                                                  lengths)
            branches.append(norm("inner", "ssm_out_norm")(ssm))
        mix = constrain(sum(branches) / len(branches) if len(branches) > 1 else branches[0],
                        ("batch", "length", "inner"))
        x = x + Dense((cfg.hidden_size,), ("inner", "embed"), cfg.param_dtype, cfg.initializer_range,
                      name="out_proj")(mix)
        x = x + MLP(cfg, name="mlp")(norm("embed", "mlp_norm")(x))
        return constrain(x, ("batch", "length", "embed")), LayerState(kv, ssm_state)
