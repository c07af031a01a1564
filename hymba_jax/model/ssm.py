"""The SSM branch: one Mamba-1 (S6) selective state-space model of width d_inner.

    xs, z = in_proj(u);  x = silu(causal_conv(xs));  dt, B, C = norms(x_proj(x))
    y = selective_scan(x, dt_proj(dt), -exp(A_log), B, C, D, z, dt_bias)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from hymba_jax.config import HymbaConfig
from hymba_jax.model.norms import RMSNorm
from hymba_jax.model.params import Dense, accum_dtype, logical_param
from hymba_jax.ops.auto import scan_backend
from hymba_jax.ops.scan import selective_scan, selective_step, skip_and_gate


class SSMState(NamedTuple):
    """What the SSM branch carries across positions.

    conv: (B, d_conv - 1, d_inner) the last pre-conv inputs xs; ssm: (B, d_inner, d_state) fp32.
    """

    conv: jax.Array
    ssm: jax.Array


def causal_conv(xs: jax.Array, context: jax.Array, weight: jax.Array, bias: Optional[jax.Array],
                doc_pos: Optional[jax.Array]) -> jax.Array:
    """Depthwise causal conv in fp32: out[t] = sum_j weight[j] * xs[t - (K-1) + j] + bias.

    xs (B, T, D); context (B|1, K-1, D) the inputs before xs[0] (zeros at the start of a sequence, the
    meta tokens' tail after them); weight (K, D). With doc_pos (B, T), the position of each token in its
    packed document, taps that would reach into the previous document read `context` instead, so every
    document starts from the same context. Returns (B, T, D) fp32.
    """
    batch, length, width = xs.shape
    taps = weight.shape[0]
    acc = accum_dtype(xs.dtype)
    context = jnp.broadcast_to(context, (batch, taps - 1, width))
    ext = jnp.concatenate([context, xs], axis=1).astype(acc)        # ext[t + K - 1] = xs[t]
    out = jnp.zeros((batch, length, width), acc)
    if bias is not None:
        out = out + bias.astype(acc)
    t = jnp.arange(length)
    for j in range(taps):
        shift = taps - 1 - j
        if doc_pos is None:
            tap = ext[:, j:j + length]
        else:
            index = j + jnp.where(doc_pos >= shift, t, doc_pos)
            tap = jnp.take_along_axis(ext, index[..., None], axis=1)
        out = out + weight[j].astype(acc) * tap
    return out


def _dt_bias_init(key, shape, dtype, dt_min=0.001, dt_max=0.1, floor=1e-4):
    """Mamba's init: softplus(bias) log-uniform in [dt_min, dt_max]."""
    dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key, shape, dtype):
    """Mamba's S4D-real init: A = -(1..N) for every channel."""
    del key
    return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=jnp.float32)), shape).astype(dtype)


class SSMBranch(nn.Module):
    config: HymbaConfig

    @nn.compact
    def __call__(self, u: jax.Array, prefix: Optional[SSMState], doc_pos: Optional[jax.Array],
                 lengths: Optional[jax.Array] = None) -> tuple[jax.Array, SSMState]:
        """u (B, T, d) normalised input; prefix: the state before the first position (None: zeros);
        doc_pos (B, T) position in the packed document, or None for one document per row; lengths (B,) or
        None: row b holds lengths[b] real positions followed by padding (ragged batches in inference).

        Returns the gated SSM output (B, T, d_inner) and the state after the last real position.
        """
        cfg = self.config
        width, n = cfg.d_inner, cfg.d_state
        xz = Dense((2, width), ("embed", None, "inner"), cfg.param_dtype, cfg.initializer_range,
                   name="in_proj")(u)
        xs, z = xz[..., 0, :], xz[..., 1, :]

        bound = 1.0 / math.sqrt(cfg.d_conv)
        uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
        conv_w = logical_param(self, "conv_weight", uniform, (cfg.d_conv, width), ("conv", "inner"),
                               cfg.param_dtype)
        conv_b = (logical_param(self, "conv_bias", uniform, (width,), ("inner",), cfg.param_dtype)
                  if cfg.conv_bias else None)
        context = (jnp.zeros((1, cfg.d_conv - 1, width), xs.dtype) if prefix is None
                   else prefix.conv.astype(xs.dtype))
        x = jax.nn.silu(causal_conv(xs, context, conv_w, conv_b, doc_pos)).astype(u.dtype)

        dbc = Dense((cfg.dt_rank + 2 * n,), ("inner", None), cfg.param_dtype, cfg.initializer_range,
                    name="x_proj")(x)
        dt, B, C = jnp.split(dbc, [cfg.dt_rank, cfg.dt_rank + n], axis=-1)
        if cfg.ssm_inner_norms:
            dt = RMSNorm(cfg.rms_norm_eps, "dt_rank", cfg.param_dtype, name="dt_norm")(dt)
            B = RMSNorm(cfg.rms_norm_eps, "state", cfg.param_dtype, name="B_norm")(B)
            C = RMSNorm(cfg.rms_norm_eps, "state", cfg.param_dtype, name="C_norm")(C)
        dt = Dense((width,), ("dt_rank", "inner"), cfg.param_dtype, cfg.dt_rank ** -0.5, name="dt_proj")(dt)
        if lengths is not None:
            # A padding step gets delta = softplus(-1e4 + bias) = 0: exp(0 * A) = 1 and delta * B * x = 0, so
            # it is the identity in any scan backend and the last state is the one after the real positions.
            real = jnp.arange(u.shape[1]) < lengths[:, None]
            dt = jnp.where(real[..., None], dt, jnp.asarray(-1e4, dt.dtype))
        dt_bias = logical_param(self, "dt_bias", _dt_bias_init, (width,), ("inner",), cfg.param_dtype)
        a_log = logical_param(self, "A_log", _a_log_init, (width, n), ("inner", "state"),
                              accum_dtype(cfg.param_dtype).name)   # A_log is kept in fp32 at least
        d_skip = logical_param(self, "D", nn.initializers.ones, (width,), ("inner",), cfg.param_dtype)

        acc = accum_dtype(u.dtype)
        A = -jnp.exp(a_log.astype(acc))
        tail = jnp.concatenate([jnp.broadcast_to(context, xs.shape[:1] + context.shape[1:]), xs], axis=1)
        if prefix is not None and doc_pos is None and u.shape[1] == 1:
            # A decode step: the recurrence once, no scan; with lengths, a row taking no token keeps its
            # state (delta = 0 above) and its conv inputs.
            last, y = selective_step(prefix.ssm, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], dt_bias)
            y = skip_and_gate(y, x[:, 0], d_skip, z[:, 0])[:, None]
            conv = tail[:, 1:] if lengths is None else jnp.where((lengths > 0)[:, None, None], tail[:, 1:],
                                                                 tail[:, :-1])
            return y, SSMState(conv=conv, ssm=last)
        y, last = selective_scan(
            x, dt, A, B, C, d_skip.astype(acc), z, dt_bias.astype(acc),
            reset=None if doc_pos is None else doc_pos == 0,
            initial_state=None if prefix is None else prefix.ssm,
            backend=scan_backend(cfg.scan_backend, cfg.dtype))
        if lengths is None:
            conv = tail[:, tail.shape[1] - (cfg.d_conv - 1):]
        else:   # the d_conv - 1 inputs before position lengths[b]: tail[b, lengths[b] : lengths[b] + K - 1]
            index = lengths[:, None] + jnp.arange(cfg.d_conv - 1)
            conv = jnp.take_along_axis(tail, index[..., None], axis=1)
        return y, SSMState(conv=conv, ssm=last)
