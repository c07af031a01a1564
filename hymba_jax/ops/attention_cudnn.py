"""The parts of the 'cudnn_skip' attention backend: cuDNN flash attention with its own masks (GPU).

The text keys use cuDNN's causal mask, with a sliding window for local layers (`sliding_window_length` =
window + 1 keys: positions q - window .. q), which skip the tiles outside the band; the meta tokens are a
second, unmasked call. Packed documents go in as an additive bias (B, 1, T, T) on top of the band (the
band still skips tiles). The two calls are merged through their log-sum-exps in
`hymba_jax.ops.attention.merged_attention`.

The public `jax.nn.dot_product_attention` returns the log-sum-exp only in the output dtype and drops its
cotangent, and its backward recomputes D = rowsum(dO * O) from its own output, so this module binds the
forward and backward primitives of `jax._src.cudnn.fused_attention_stablehlo` itself (private in jax 0.10
and 0.11: the one place to update with jax): the forward returns the fp32 log-sum-exp (B, H, T), and the
backward takes the merged output and log-sum-exp.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn

from hymba_jax.ops.attention import FlashPart

# cuDNN >= 9.10 on Hopper takes query/key heads narrower than value heads; set False to pad them with zeros
# to the value width instead (older cuDNN).
UNPADDED_HEADS = True


def _bias(segments: Optional[jax.Array], dtype) -> Optional[jax.Array]:
    """(B, 1, T, T) additive bias keeping each query inside its document, or None."""
    if segments is None:
        return None
    same = segments[:, None, :, None] == segments[:, None, None, :]
    return jnp.where(same, jnp.asarray(0, dtype), cudnn.get_large_negative_number(dtype))


def cudnn_part(*, window: Optional[int], causal: bool, scale: float, unpadded: Optional[bool] = None
               ) -> FlashPart:
    """A `FlashPart` on cuDNN: causal (top-left aligned: for queries and keys the same positions) and within
    `window` positions if given, or every key visible (causal False); segments as a bias."""
    unpadded = UNPADDED_HEADS if unpadded is None else unpadded
    mask_type = cudnn.MaskType.CAUSAL if causal else cudnn.MaskType.NO_MASK
    sliding = None if window is None else window + 1
    layout = cudnn.AttentionLayout.BTNH.value

    def inputs(q, k, v, segments):
        width = v.shape[-1]
        if not unpadded and q.shape[-1] < width:
            pad = lambda t: jnp.pad(t, [(0, 0)] * 3 + [(0, width - t.shape[-1])])
            q, k = pad(q), pad(k)
        bias = _bias(segments, q.dtype)
        none = jnp.zeros(0, q.dtype)
        args = (q, k, v, none if bias is None else bias, none, none, none, none, none, none)
        params = dict(scale=scale, seed=0, dropout_rate=0.0, variadic_args=(bias is not None, False),
                      mask_type=mask_type, layout=layout, sliding_window_length=sliding)
        return args, params

    def forward(q, k, v, segments, run_time_window):
        del run_time_window                  # None: the window is one of cuDNN's mask parameters
        args, params = inputs(q, k, v, segments)
        out, lse = cudnn._dot_product_attention_fwd_p_wrapper.bind(*args, **params, is_training=True)
        return out, lse

    def backward(q, k, v, segments, run_time_window, out, lse, dout):
        del run_time_window
        args, params = inputs(q, k, v, segments)
        dq, dk, dv = cudnn._dot_product_attention_bwd_p_wrapper.bind(*args, lse, out, dout, **params)[:3]
        dk_width = q.shape[-1]
        return dq[..., :dk_width], dk[..., :dk_width], dv

    return FlashPart(forward, backward)
