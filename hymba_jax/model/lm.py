"""The Hymba language model: embeddings, meta tokens, the layer stack and the tied LM head.

The learned meta tokens are the same for every sequence, so the model runs them as their own pass
(batch 1) and the text as a second pass that starts from the state they leave in every layer: their
keys and values (always visible to the text), the conv inputs and the SSM state. This is the same
computation as running [meta; text] in one sequence, and it is what makes packed documents exact: each
document restarts its positions, attention, conv and SSM from the meta tokens' state.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hymba_jax.config import HymbaConfig
from hymba_jax.model.attention import KV, attention_mask, with_prefix
from hymba_jax.model.block import HymbaLayer, LayerState
from hymba_jax.model.norms import RMSNorm
from hymba_jax.model.params import accum_dtype, logical_param

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, T) segment ids of packed documents -> (B, T) position of each token inside its document."""
    index = jnp.arange(segment_ids.shape[-1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=1)


class HymbaForCausalLM(nn.Module):
    """`apply({"params": p}, input_ids)` -> logits (B, T, vocab) fp32 for the text positions.

    input_ids (B, T) int. segment_ids (B, T) int, optional: packed documents (a new document starts where
    the id changes); each document is computed exactly as if it were alone. With return_hidden_states,
    also returns the input of every layer and the final-norm output, each (B, M + T, d) with the M meta
    positions in front (the fixtures' definition).
    """

    config: HymbaConfig

    def _layer_class(self):
        if self.config.remat == "none":
            return HymbaLayer
        return nn.remat(HymbaLayer, policy=REMAT_POLICIES[self.config.remat], prevent_cse=True)

    @nn.compact
    def __call__(self, input_ids: jax.Array, segment_ids: Optional[jax.Array] = None, *,
                 return_hidden_states: bool = False):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        batch, length = input_ids.shape
        meta_len = cfg.num_meta_tokens
        embedding = logical_param(self, "embedding", nn.initializers.normal(cfg.initializer_range),
                                  (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        x = jnp.take(embedding, input_ids, axis=0).astype(dtype)

        text_index = jnp.arange(length)[None]
        if segment_ids is None:
            doc_pos, query_segment = None, None
            positions = meta_len + text_index
        else:
            doc_pos = document_positions(segment_ids)
            positions, query_segment = meta_len + doc_pos, segment_ids
        window = cfg.sliding_window
        text_masks = {
            is_global: with_prefix(attention_mask(text_index, text_index, window=None if is_global else window,
                                                  query_segment=query_segment, key_segment=query_segment),
                                   meta_len)
            for is_global in (True, False)
        }

        if meta_len:
            meta = logical_param(self, "meta_tokens", nn.initializers.normal(1.0), (meta_len, cfg.hidden_size),
                                 ("meta", "embed"), cfg.param_dtype)
            xm = meta[None].astype(dtype)
            meta_index = jnp.arange(meta_len)[None]
            meta_mask = attention_mask(meta_index, meta_index, window=None)  # all meta keys are visible
        hidden_states = []
        meta_kv: dict[int, KV] = {}
        text_kv: dict[int, KV] = {}
        layer_cls = self._layer_class()
        for i in range(cfg.num_layers):
            layer = layer_cls(cfg, i, name=f"layers_{i}")
            producer = cfg.kv_producer(i)
            if return_hidden_states:
                hidden_states.append(self._with_meta(xm if meta_len else None, x))
            prefix = None
            if meta_len:
                xm, meta_state = layer(xm, meta_index, meta_mask, None, None, meta_kv.get(producer))
                prefix = LayerState(meta_kv.setdefault(producer, meta_state.kv), meta_state.ssm)
            x, state = layer(x, positions, text_masks[cfg.is_global(i)], doc_pos, prefix, text_kv.get(producer))
            if state.kv is not None:
                text_kv[i] = state.kv

        final_norm = RMSNorm(cfg.rms_norm_eps, "embed", cfg.param_dtype, name="final_norm")
        x = final_norm(x)
        if return_hidden_states:
            hidden_states.append(self._with_meta(final_norm(xm) if meta_len else None, x))
        if cfg.tie_word_embeddings:
            head = embedding.T
        else:
            head = logical_param(self, "lm_head", nn.initializers.normal(cfg.initializer_range),
                                 (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)
        logits = jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=accum_dtype(dtype))
        if return_hidden_states:
            return logits, hidden_states
        return logits

    @staticmethod
    def _with_meta(xm: Optional[jax.Array], x: jax.Array) -> jax.Array:
        if xm is None:
            return x
        return jnp.concatenate([jnp.broadcast_to(xm, (x.shape[0],) + xm.shape[1:]), x], axis=1)


def init_params(config: HymbaConfig, rng: jax.Array, length: int = 8) -> dict:
    """Randomly initialised parameters (plain arrays, logical-axis boxes removed)."""
    ids = jnp.zeros((1, length), jnp.int32)
    return nn.meta.unbox(HymbaForCausalLM(config).init(rng, ids)["params"])


def param_shapes(config: HymbaConfig) -> dict:
    """The parameter tree as ShapeDtypeStructs, nothing allocated."""
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda r, i: HymbaForCausalLM(config).init(r, i)["params"],
                           jax.random.key(0), ids)
    return nn.meta.unbox(boxed)
