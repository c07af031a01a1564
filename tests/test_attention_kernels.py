"""The fused-attention op (hymba_jax.ops.attention) against the XLA reference on the model's masks.

On CPU the op runs jax.nn.dot_product_attention's 'xla' implementation with the same head padding, prefix
concatenation and mask handling that the 'cudnn' backend uses on the GPU (benchmarks/attention.py checks
cuDNN itself on the H200). fp32: both sides are the same softmax attention with sums in other orders,
errors ~1e-7; 1e-5 relative catches any wrong mask entry, scale or head mapping (errors of order 1e-1).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from hymba_jax.config import ConfigError, hymba_tiny
from hymba_jax.model.attention import KV, attend, attention_mask, dot_product_attention, text_mask, with_prefix
from hymba_jax.ops.attention import fused_attention

B, T, M, H, KVH, DK, DV = 2, 12, 3, 4, 2, 8, 16


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize("window,packed", [(None, False), (4, False), (4, True)],
                         ids=["global", "window", "window-packed"])
def test_fused_matches_reference(window, packed):
    ks = jax.random.split(jax.random.key(0), 6)
    q = jax.random.normal(ks[0], (B, T, H, DK))
    k = jax.random.normal(ks[1], (B, T, KVH, DK))
    v = jax.random.normal(ks[2], (B, T, KVH, DV))
    prefix = KV(jax.random.normal(ks[3], (1, M, KVH, DK)), jax.random.normal(ks[4], (1, M, KVH, DV)))
    index = jnp.arange(T)[None]
    seg = jnp.array([[0] * 5 + [1] * 7, [0] * 12]) if packed else None
    mask = with_prefix(attention_mask(index, index, window=window, query_segment=seg, key_segment=seg), M)
    w = jax.random.normal(ks[5], (B, T, H, DV))

    def run(fn):
        return jax.value_and_grad(lambda q_, k_, v_: jnp.sum(fn(q_, k_, v_) * w), argnums=(0, 1, 2))(q, k, v)

    ref_out = dot_product_attention(q, k, v, mask, prefix)
    out = fused_attention(q, k, v, mask, prefix, implementation="xla")
    assert out.shape == ref_out.shape == (B, T, H, DV)
    assert rel(out, ref_out) < 1e-5
    (_, grads), (_, ref_grads) = (run(lambda *a: fused_attention(*a, mask, prefix, implementation="xla")),
                                  run(lambda *a: dot_product_attention(*a, mask, prefix)))
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 1e-5


def test_config_refuses_unknown_backend():
    with pytest.raises(ConfigError, match="attention_backend"):
        hymba_tiny(attention_backend="flash")


def test_decode_kernel_matches_reference(slots=48, groups=5):
    """The decode step's Pallas kernel (interpret mode) over a cache of 48 slots (3 blocks of 16; 5 query
    heads per KV head, padded to 16 rows) plus the position's own key, against the XLA reference, fp32. The
    mask hides random slots (empty and out-of-window ones), rows differ, and row 1 sees none of the cache
    (only its own key)."""
    from hymba_jax.model.attention import decode_attention
    heads = KVH * groups
    ks = jax.random.split(jax.random.key(slots), 6)
    q = jax.random.normal(ks[0], (B, 1, heads, 16))
    k = jax.random.normal(ks[1], (B, 1, KVH, 16))
    v = jax.random.normal(ks[2], (B, 1, KVH, 32))
    # The engine's view of buffers stored (B, KV, slots, d).
    prefix = KV(jnp.swapaxes(jax.random.normal(ks[3], (B, KVH, slots, 16)), 1, 2),
                jnp.swapaxes(jax.random.normal(ks[4], (B, KVH, slots, 32)), 1, 2))
    visible = jax.random.bernoulli(ks[5], 0.5, (B, 1, slots)).at[1].set(False)
    mask = jnp.concatenate([visible, jnp.ones((B, 1, 1), bool)], axis=-1)
    got = decode_attention(q, k, v, mask, prefix, interpret=True)
    want = dot_product_attention(q, k, v, mask, prefix)
    assert got.shape == want.shape == (B, 1, heads, 32)
    assert rel(got, want) < 1e-5
    assert rel(got[1], v[1].repeat(groups, axis=1)) < 1e-6     # only its own value


# --------------------------------------------------------------------------------------------------
# Tile-skipping attention: a kernel for the text keys (splash: TPU; pallas_flash: Triton; both here in the
# Pallas interpreter), the meta tokens in XLA, merged through the log-sum-exp. 256 text positions in tiles
# of 128 (splash) or 128 in blocks of 32 (Triton): a window of 64 or 40 skips the tiles below the band, so
# the block-sparse bookkeeping is exercised, not only the elementwise mask.

SM, SH, SKV, SDK, SDV = 32, 2, 1, 64, 128


def _splash(window, scale):
    """Attention fn(q, k, v, prefix, segments): splash for the text keys, the prefix in XLA."""
    from hymba_jax.ops.attention import merged_attention, xla_prefix_part
    from hymba_jax.ops.attention_splash import splash_part
    text = splash_part(window=window, scale=scale, block=128, interpret=True)
    return lambda *a: merged_attention(text, xla_prefix_part(scale), *a)


def _pallas_flash(config):
    def make(window, scale):
        from hymba_jax.ops.attention_flash_gpu import FlashConfig, flash_attention

        return functools.partial(flash_attention, window=window, scale=scale, config=FlashConfig.parse(config),
                                 interpret=True)
    return make


# Blocks of queries x keys per kernel (forward/dq/dkv), wider one way and the other, so the band's bounds
# are exercised for block_q != block_k both ways.
WIDE_Q, WIDE_K = "32:16:4:1/16:32:4:1/32:16:4:1", "16:32:4:1/32:16:4:1/16:32:4:1"


# pallas_flash takes SM = 32 meta keys (whole key blocks of WIDE_Q and WIDE_K) into its kernels and 24 to XLA.
@pytest.mark.parametrize("kernel,length,window,boundary,meta_len", [
    (_splash, 256, None, None, SM), (_splash, 256, 64, None, SM), (_splash, 256, 64, 100, SM),
    (_pallas_flash(WIDE_Q), 128, None, None, 24), (_pallas_flash(WIDE_Q), 128, 40, None, 24),
    (_pallas_flash(WIDE_K), 128, 40, 50, 24), (_pallas_flash(WIDE_Q), 128, 8, 70, 24),
    (_pallas_flash(WIDE_K), 128, None, None, SM), (_pallas_flash(WIDE_Q), 128, 40, 50, SM),
], ids=["splash-global", "splash-window", "splash-window-packed", "flash-global", "flash-window",
        "flash-window-packed", "flash-narrow-window-packed", "flash-meta-in-kernel-global",
        "flash-meta-in-kernel-window-packed"])
def test_skipping_kernels_match_reference(kernel, length, window, boundary, meta_len):
    """Outputs and the gradients of q, k, v and the meta keys/values in fp32: kernel + merge (or the meta
    keys in the kernels) against `dot_product_attention` on the same TextMask (packed: a document boundary
    inside a tile; the narrow window (8) is below a block, so no block lies wholly inside the band)."""
    ks = jax.random.split(jax.random.key(1), 6)
    q = jax.random.normal(ks[0], (1, length, SH, SDK))
    k = jax.random.normal(ks[1], (1, length, SKV, SDK))
    v = jax.random.normal(ks[2], (1, length, SKV, SDV))
    meta = (jax.random.normal(ks[3], (1, meta_len, SKV, SDK)), jax.random.normal(ks[4], (1, meta_len, SKV, SDV)))
    seg = None if boundary is None else jnp.array([[0] * boundary + [1] * (length - boundary)])
    mask = text_mask(length, window=window, segments=seg, num_prefix=meta_len)
    w = jax.random.normal(ks[5], (1, length, SH, SDV))
    scale = SDK ** -0.5
    fused = lambda q_, k_, v_, mk, mv: kernel(window, scale)(q_, k_, v_, (mk, mv), seg)
    reference = lambda q_, k_, v_, mk, mv: dot_product_attention(q_, k_, v_, mask.dense, KV(mk, mv))
    run = lambda fn: jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=range(5))(q, k, v, *meta)
    assert rel(fused(q, k, v, *meta), reference(q, k, v, *meta)) < 1e-5
    for g, r in zip(run(fused)[1], run(reference)[1]):
        assert g.shape == r.shape
        assert rel(g, r) < 1e-5


def test_flash_window_is_data_one_compile_for_both_layer_kinds():
    """`layer_kind_mask` turns a layer's kind into data: one jitted program of the kind (the one-body layer
    scan's situation) runs the pallas_flash kernels (interpret mode) for a global and a sliding-window layer,
    each equal to `dot_product_attention` on its own mask (outputs and q/k/v/meta gradients, fp32, packed),
    and is traced once."""
    from hymba_jax.model.attention import layer_kind_mask

    length, meta_len, window = 128, SM, 40
    ks = jax.random.split(jax.random.key(3), 6)
    q = jax.random.normal(ks[0], (1, length, SH, SDK))
    k = jax.random.normal(ks[1], (1, length, SKV, SDK))
    v = jax.random.normal(ks[2], (1, length, SKV, SDV))
    meta = (jax.random.normal(ks[3], (1, meta_len, SKV, SDK)), jax.random.normal(ks[4], (1, meta_len, SKV, SDV)))
    w = jax.random.normal(ks[5], (1, length, SH, SDV))
    seg = jnp.array([[0] * 50 + [1] * (length - 50)])
    masks = {g: text_mask(length, window=None if g else window, segments=seg, num_prefix=meta_len)
             for g in (True, False)}
    traces = []

    @jax.jit
    def grads(is_global, *args):
        traces.append(is_global)
        mask = layer_kind_mask(masks, is_global)
        assert mask.window is None and mask.run_time_window is not None
        loss = lambda q_, k_, v_, mk, mv: jnp.sum(attend(q_, k_, v_, mask, KV(mk, mv), "pallas_flash") * w)
        return jax.value_and_grad(loss, argnums=range(5))(*args)

    from hymba_jax.ops import attention_flash_gpu
    with pytest.MonkeyPatch.context() as patch:     # the kernels in the Pallas interpreter
        interpreted = functools.partial(attention_flash_gpu.flash_attention, interpret=True)
        patch.setattr(attention_flash_gpu, "flash_attention", interpreted)
        for is_global in (True, False):
            got = grads(jnp.asarray(is_global), q, k, v, *meta)
            ref_loss = lambda q_, k_, v_, mk, mv: jnp.sum(
                dot_product_attention(q_, k_, v_, masks[is_global].dense, KV(mk, mv)) * w)
            want = jax.value_and_grad(ref_loss, argnums=range(5))(q, k, v, *meta)
            assert rel(got[0], want[0]) < 1e-5
            for g, r in zip(got[1], want[1]):
                assert rel(g, r) < 1e-5
    assert len(traces) == 1


@pytest.mark.parametrize("block_q,block_k", [(16, 16), (32, 16), (16, 64), (128, 64)])
@pytest.mark.parametrize("window", [None, 1, 8, 40, 1024])
def test_flash_band_bounds_are_exact(block_q, block_k, window, length=256):
    """The Triton kernels' loop bounds against the mask itself: a block pair is walked iff some query sees
    some key in it, and walked unmasked iff every query sees every key. A global layer (window None) runs
    the kernels with the text length as its window."""
    import numpy as np

    from hymba_jax.ops.attention_flash_gpu import _key_blocks, _query_blocks

    qpos, kpos = np.arange(length)[:, None], np.arange(length)[None, :]
    seen = (kpos <= qpos) & (True if window is None else qpos - kpos <= window)
    nq, nk = length // block_q, length // block_k
    tiles = seen.reshape(nq, block_q, nk, block_k)
    some, every = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))

    def walked(lo, a, b, hi, n):
        lo, a, b, hi = (int(x) for x in (lo, a, b, hi))
        assert lo <= a <= b <= hi <= n
        return set(range(lo, hi)), set(range(a, b))

    band = length if window is None else window
    for i in range(nq):
        any_, all_ = walked(*_key_blocks(i, block_q, block_k, band), nk)
        assert any_ == set(np.flatnonzero(some[i])) and all_ == set(np.flatnonzero(every[i])), (i, any_, all_)
    for j in range(nk):
        any_, all_ = walked(*_query_blocks(j, block_q, block_k, nq, band), nq)
        assert any_ == set(np.flatnonzero(some[:, j])) and all_ == set(np.flatnonzero(every[:, j])), (j, any_, all_)


def test_flash_config_parsing_and_defaults():
    from hymba_jax.ops.attention import SKIPPING_BACKENDS
    from hymba_jax.ops.attention_flash_gpu import DEFAULT_CONFIG, FlashConfig, KernelConfig

    config = FlashConfig.parse("128:64:4:3/128:32:8:2/32:128:8:1")
    assert config.dq == KernelConfig(128, 32, 8, 2) and config.length_multiple == 128
    assert FlashConfig.parse(str(config)) == config
    assert FlashConfig.parse("64:64:4:2") == FlashConfig(*[KernelConfig(64, 64, 4, 2)] * 3)
    assert SKIPPING_BACKENDS["pallas_flash"] % DEFAULT_CONFIG.length_multiple == 0
    for bad in ("64:64:4", "64:48:4:2", "8:64:4:2", "64:64:3:2", "64:64:4:2/64:64:4:2"):
        with pytest.raises(ValueError, match="pallas_flash"):
            FlashConfig.parse(bad)


@pytest.mark.parametrize("window,packed,m", [(1024, True, 128), (None, False, 128), (1024, True, 96)],
                         ids=["window-packed", "global", "window-packed-meta-in-xla"])
def test_pallas_flash_lowers_to_triton(window, packed, m):
    """The Triton kernels lower for CUDA at the 1.5B layer shape on the CPU (three kernels: forward, dq,
    dk/dv; compiling them needs the GPU), with and without segment ids, the meta keys in the kernels (128:
    whole key blocks) or in XLA (96)."""
    bf = jnp.bfloat16
    b, t, h, kvh = 2, 2048, 25, 5
    q, k, v = (jax.ShapeDtypeStruct(s, bf) for s in ((b, t, h, 64), (b, t, kvh, 64), (b, t, kvh, 128)))
    meta = KV(jax.ShapeDtypeStruct((1, m, kvh, 64), bf), jax.ShapeDtypeStruct((1, m, kvh, 128), bf))
    mask = text_mask(t, window=window, segments=jnp.zeros((b, t), jnp.int32) if packed else None, num_prefix=m)
    fn = lambda q_, k_, v_, p: attend(q_, k_, v_, mask, p, "pallas_flash")
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, meta).lower(
        lowering_platforms=("cuda",)).as_text()
    assert hlo.count("__gpu$xla.gpu.triton") == 3


def test_splash_needs_whole_tiles():
    from hymba_jax.ops.attention_splash import block_size

    assert block_size(2048) == 512 and block_size(384) == 384 and block_size(640) == 128
    with pytest.raises(ValueError, match="multiple of 128"):
        block_size(200)


def test_skipping_backends_fall_back_to_dense_masks():
    """A plain mask array (decode, the meta pass) never reaches a skipping kernel, nor a length splash
    cannot tile: 'splash' runs the XLA reference on them; a TextMask whose prefix is not the given K/V is
    refused."""
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (B, T, H, DK))
    k = jax.random.normal(ks[1], (B, T, KVH, DK))
    v = jax.random.normal(ks[2], (B, T, KVH, DV))
    index = jnp.arange(T)[None]
    dense = attention_mask(index, index, window=None)
    assert rel(attend(q, k, v, dense, None, "splash"), dot_product_attention(q, k, v, dense)) == 0
    untileable = text_mask(T, window=None, segments=None, num_prefix=0)          # T = 12: no 128-tiles
    assert rel(attend(q, k, v, untileable, None, "splash"), dot_product_attention(q, k, v, untileable.dense)) == 0
    with pytest.raises(ValueError, match="prefix"):
        attend(q, k, v, text_mask(T, window=None, segments=None, num_prefix=M), None, "splash")


@pytest.mark.parametrize("window,packed", [(None, False), (4, True)], ids=["global", "window-packed"])
def test_cudnn_skip_shapes_and_gradient_plumbing(window, packed):
    """cuDNN does not run on the CPU; the abstract evaluation of 'cudnn_skip' forward and backward checks
    what the CPU can: the private primitives take these arguments, the log-sum-exp comes back (B, H, T)
    fp32, every input gets a gradient of its shape, and the cuDNN calls carry the intended masks (the
    H200 itself: docs/performance.md)."""
    bf = jnp.bfloat16
    q, k, v = (jax.ShapeDtypeStruct(s, bf) for s in ((B, T, H, DK), (B, T, KVH, DK), (B, T, KVH, DV)))
    meta = KV(jax.ShapeDtypeStruct((1, M, KVH, DK), bf), jax.ShapeDtypeStruct((1, M, KVH, DV), bf))
    seg = jnp.array([[0] * 5 + [1] * 7, [0] * 12]) if packed else None
    mask = text_mask(T, window=window, segments=seg, num_prefix=M)
    loss = lambda q_, k_, v_, p: jnp.sum(attend(q_, k_, v_, mask, p, "cudnn_skip").astype(jnp.float32))
    out = jax.eval_shape(lambda *a: attend(*a, mask, meta, "cudnn_skip"), q, k, v)
    assert (out.shape, out.dtype) == ((B, T, H, DV), bf)
    grads = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2, 3)), q, k, v, meta)
    assert [(g.shape, g.dtype) for g in jax.tree.leaves(grads)] == [(t.shape, bf) for t in (q, k, v, *meta)]
    # Lowered for CUDA (no GPU needed): two flash calls each way, the text's causal with cuDNN's window
    # of window + 1 keys (or none), the meta tokens' unmasked; packed documents add a bias to the text's.
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(q, k, v, meta).lower(
        lowering_platforms=("cuda",)).as_text().replace("\\22", '"')
    assert hlo.count('"is_flash_attention": true') == 4
    assert hlo.count('"mask_type": "CAUSAL"') == 2 and hlo.count('"mask_type": "NO_MASK"') == 2
    assert hlo.count(f'"sliding_window_length": {window + 1 if window else 0}') == (2 if window else 4)
    assert hlo.count("fmhaScaleBiasSoftmax") == (2 if packed else 0)


SHARDED_SPLASH = """
import json
import jax, jax.numpy as jnp
from hymba_jax.model.attention import KV, dot_product_attention, text_mask
from hymba_jax.ops.attention import merged_attention, per_device, xla_prefix_part
from hymba_jax.ops.attention_splash import splash_part
from hymba_jax.parallel import DEFAULT_AXIS_RULES, make_mesh, sharding_context

mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
b, t, m, h, kvh, dk, dv = 2, 256, 16, 4, 2, 64, 128
ks = jax.random.split(jax.random.key(5), 6)
q, k = jax.random.normal(ks[0], (b, t, h, dk)), jax.random.normal(ks[1], (b, t, kvh, dk))
v = jax.random.normal(ks[2], (b, t, kvh, dv))
meta = KV(jax.random.normal(ks[3], (1, m, kvh, dk)), jax.random.normal(ks[4], (1, m, kvh, dv)))
w = jax.random.normal(ks[5], (b, t, h, dv))
seg = jnp.array([[0] * 100 + [1] * 156, [0] * 200 + [1] * 56])
mask = text_mask(t, window=64, segments=seg, num_prefix=m)
part = splash_part(window=64, scale=dk ** -0.5, block=128, interpret=True)
merged = lambda *c: merged_attention(part, xla_prefix_part(dk ** -0.5), *c)
kernel = lambda *a: per_device(merged, *a[:3], KV(*a[3:]), seg)
reference = lambda *a: dot_product_attention(*a[:3], mask.dense, KV(*a[3:]))
grad = lambda fn: jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * w), argnums=range(5))
args = (q, k, v, *meta)
ref = jax.jit(grad(reference))(*args)
args = jax.device_put(args, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
sharded = jax.jit(sharding_context(mesh, DEFAULT_AXIS_RULES)(grad(kernel)))
jaxpr = str(jax.make_jaxpr(sharded)(*args))
got = sharded(*args)
rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
print(json.dumps(dict(shard_maps=jaxpr.count("shard_map"), loss=rel(got[0], ref[0]),
                      grads=[rel(g, r) for g, r in zip(got[1], ref[1])])))
"""


@pytest.mark.slow
def test_splash_runs_per_device_under_a_mesh():
    """On 4 simulated devices (data 2 x tensor 2), inside the sharding context, splash runs in shard_map on
    each device's rows and heads (2 query heads over 1 KV head each); the loss and the gradients of q, k, v
    and the meta keys/values (summed across the data axis) equal the unsharded reference's in fp32."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", SHARDED_SPLASH], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shard_maps"] >= 1, result
    assert result["loss"] < 1e-5 and max(result["grads"]) < 1e-5, result     # the loss: a sum that cancels


@pytest.mark.parametrize("backend", ["xla", "splash", "cudnn"])
def test_decode_steps_pick_their_path_by_backend(backend, monkeypatch):
    """A one-query step after a 32-slot cache: the Triton decode kernel only on a GPU backend (replaced here
    by a recorder, since the CPU cannot run it); XLA for 'xla' and for TPU's 'splash', with the reference's
    values."""
    import hymba_jax.model.attention as attention

    calls = []
    monkeypatch.setattr(attention, "decode_attention", lambda *a, **k: calls.append(a) or "kernel")
    ks = jax.random.split(jax.random.key(3), 5)
    q, k = jax.random.normal(ks[0], (B, 1, H, 16)), jax.random.normal(ks[1], (B, 1, KVH, 16))
    v = jax.random.normal(ks[2], (B, 1, KVH, 16))
    prefix = KV(jax.random.normal(ks[3], (B, 32, KVH, 16)), jax.random.normal(ks[4], (B, 32, KVH, 16)))
    mask = jnp.ones((B, 1, 33), bool)
    out = attend(q, k, v, mask, prefix, backend)
    if backend == "cudnn":
        assert out == "kernel" and len(calls) == 1
    else:
        assert not calls and rel(out, dot_product_attention(q, k, v, mask, prefix)) == 0
