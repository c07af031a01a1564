"""The 'pallas_flash' attention backend (`flash_attention`): Pallas (Triton) flash-attention kernels for the
Hymba mask, the alternative to cuDNN's masks ('cudnn_skip'); timings in docs/performance.md.

Three kernels, each with its own tile shape and Triton launch parameters (`FlashConfig`, defaults in
`DEFAULT_CONFIG`):

* forward: a program per block of queries of one query head (GQA: it reads K/V head h // group) loops over
  the key blocks the causal or window band reaches, online softmax; it returns the output and the fp32
  log-sum-exp.
* dq: the same walk, from the merged output's log-sum-exp (`hymba_jax.ops.attention.FlashPart`); it also
  writes D = rowsum(dO * O) for the dk/dv kernel.
* dk/dv: a program per block of keys of one KV head loops over the group's query heads and, for each, the
  query blocks that see those keys; dk and dv accumulate over the whole group in fp32 and are written once
  in K/V's dtype.

Only the blocks on the band's edges (the diagonal; a window's far end) compare positions: the blocks wholly
inside the band skip the mask (`_key_blocks`, `_query_blocks`). Segment ids (packed documents), when given,
are compared in every block. Scores are kept in base-2 units (scale * log2 e folded into one multiply) so
the exponential is one `ex2` instruction. The heaviest programs of a causal layer go first (query blocks in
reverse order). q/k heads keep their own width (64), v heads theirs (128). The meta tokens go into the same
kernels as prefix keys before the text keys, visible to every query (`flash_attention`; a prefix that is not
a whole number of key blocks goes to XLA, merged through the log-sum-exp). `interpret=True` runs the same
kernels on the CPU (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hymba_jax.ops.attention import FlashPart, merged_attention, xla_prefix_part

try:  # the Triton compiler parameters (not needed in interpret mode)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

NEG = -1e30          # masked logits; every row sees its own key, so no row is left all masked
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One kernel's tile (block_q queries x block_k keys, powers of two >= 16: Triton's matmul tiles) and
    Triton's num_warps / num_stages (software pipelining depth of the loops)."""

    block_q: int
    block_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        pow2 = lambda n: n >= 1 and n & (n - 1) == 0
        if not (pow2(self.block_q) and pow2(self.block_k) and min(self.block_q, self.block_k) >= 16):
            raise ValueError(f"pallas_flash: blocks must be powers of two >= 16, got {self}")
        if not pow2(self.num_warps) or self.num_warps > 16 or self.num_stages < 1:
            raise ValueError(f"pallas_flash: num_warps must be 1..16, a power of two, num_stages >= 1: {self}")

    def __str__(self) -> str:
        return f"{self.block_q}:{self.block_k}:{self.num_warps}:{self.num_stages}"

    @classmethod
    def parse(cls, spec: str) -> "KernelConfig":
        """'block_q:block_k:num_warps:num_stages', e.g. '128:64:4:3'."""
        fields = spec.split(":")
        if len(fields) != 4 or not all(f.isdigit() for f in fields):
            raise ValueError(f"pallas_flash: kernel config {spec!r} is not block_q:block_k:num_warps:num_stages")
        return cls(*map(int, fields))


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """The three kernels' configurations."""

    forward: KernelConfig
    dq: KernelConfig
    dkv: KernelConfig

    def __str__(self) -> str:
        return f"{self.forward}/{self.dq}/{self.dkv}"

    @classmethod
    def parse(cls, spec: str) -> "FlashConfig":
        """'bq:bk:warps:stages' for all three kernels, or 'forward/dq/dkv', three such separated by '/'."""
        parts = [KernelConfig.parse(s) for s in spec.split("/")]
        if len(parts) not in (1, 3):
            raise ValueError(f"pallas_flash: config {spec!r} names {len(parts)} kernels; give 1 or 3 (forward/dq/dkv)")
        return cls(*(parts * 3 if len(parts) == 1 else parts))

    @property
    def length_multiple(self) -> int:
        """The text length must be a multiple of every block (all powers of two: of the largest)."""
        return max(max(c.block_q, c.block_k) for c in (self.forward, self.dq, self.dkv))

    @property
    def key_multiple(self) -> int:
        """A prefix in the kernels must be a whole number of every kernel's key blocks."""
        return max(c.block_k for c in (self.forward, self.dq, self.dkv))


# The fastest of each kernel in the H200 sweep (docs/performance.md, benchmarks/attention.py --flash-variants
# --flash-parts; 8 x 2048 and 4 x 4096, window 1024 and global): 64 x 64 tiles over 4 warps for the forward
# and dq, 32-query x 64-key tiles for dk/dv.
DEFAULT_CONFIG = FlashConfig(forward=KernelConfig(64, 64, 4, 3), dq=KernelConfig(64, 64, 4, 2),
                             dkv=KernelConfig(32, 64, 4, 3))


def _band_blocks(first_masked_lo, full_lo, full_hi, hi):
    """(lo, a, b, hi): blocks [lo, hi) are visible in part or whole, [a, b) in whole (a <= b), clamped."""
    a = jnp.minimum(jnp.maximum(full_lo, first_masked_lo), hi)
    b = jnp.minimum(jnp.maximum(full_hi, a), hi)
    return first_masked_lo, a, b, hi


def _key_blocks(i, block_q: int, block_k: int, window):
    """Key blocks of query block i (queries q0 .. q0 + block_q - 1, q0 = i * block_q), as (lo, a, b, hi):
    [lo, hi) hold a key some query sees (key <= query, query - key <= window), [a, b) only keys every
    query sees. Causal: key block ends <= q0; window: key block starts >= q0 + block_q - 1 - window (a
    window of the text length or more: from block 0, the global layers' band)."""
    q0 = i * block_q
    hi = (q0 + block_q - 1) // block_k + 1          # the block of the last query's own key, inclusive
    full_hi = (q0 + 1) // block_k                   # blocks whose last key <= q0
    lo = jnp.maximum(q0 - window, 0) // block_k      # the block of the first query's farthest key
    full_lo = (jnp.maximum(q0 + block_q - 1 - window, 0) + block_k - 1) // block_k
    return _band_blocks(lo, full_lo, full_hi, hi)


def _query_blocks(j, block_q: int, block_k: int, nq: int, window):
    """Query blocks that see key block j (keys k0 .. k0 + block_k - 1, k0 = j * block_k), as (lo, a, b, hi)
    like `_key_blocks`: whole from the first block starting at or after the last key, up to the last block
    whose last query is within `window` of k0."""
    k0 = j * block_k
    lo = k0 // block_q
    full_lo = (k0 + block_k - 1 + block_q - 1) // block_q
    hi = jnp.minimum((k0 + block_k - 1 + window) // block_q + 1, nq)
    full_hi = (k0 + window + 1) // block_q
    return _band_blocks(lo, full_lo, full_hi, hi)


def _sweep(bounds, body, carry):
    """body(masked, j, carry) over the band's blocks: the edge blocks [lo, a) and [b, hi) with masked=True
    in one loop, then [a, b) with masked=False."""
    lo, a, b, hi = bounds
    edge = lambda t: jnp.where(t < a - lo, lo + t, b + t - (a - lo))
    carry = jax.lax.fori_loop(0, (a - lo) + (hi - b), lambda t, c: body(True, edge(t), c), carry)
    return jax.lax.fori_loop(a, b, functools.partial(body, False), carry)


def _visible(qpos, kpos, window):
    """Causal and window visibility of broadcastable query and key positions."""
    return (kpos <= qpos) & (qpos - kpos <= window)


def _rows(start, size: int):
    return pl.ds(pl.multiple_of(start * size, size), size)


def _masked_scores(a, b, scale2: float, masked: bool, visible, same):
    """a b^T * scale2 in fp32 (base-2 logits; a, b (n, d) and (m, d)), NEG where a key is hidden: outside
    the causal or window band (`visible()`, evaluated only on the band's edge blocks, where `masked`) or in
    another document (`same`, bool (n, m); None without segment ids)."""
    s = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale2
    keep = visible() if masked else None
    if same is not None:
        keep = same if keep is None else keep & same
    return s if keep is None else jnp.where(keep, s, NEG)


def flash_gpu_part(*, scale: float, config: FlashConfig = DEFAULT_CONFIG, num_prefix: int = 0,
                   interpret: bool = False) -> FlashPart:
    """The `FlashPart` of the text keys on Triton, causal within the run-time window (an int32 scalar; a
    global layer's is the text length, so one compiled kernel per shape serves both layer kinds), documents
    apart by segments.

    With `num_prefix` = P > 0 the K/V given are [P prefix keys | T text keys] (B, P + T, KV, d), the prefix
    (the meta tokens) visible to every query whatever its document: the forward and dq kernels walk the
    prefix blocks first, unmasked; the dk/dv kernel's prefix blocks walk every query block, and run first
    (the heaviest programs). P must be a multiple of every key block."""
    scale2 = scale * LOG2E          # scores in base-2 units

    def call(kernel, cfg: KernelConfig, grid, in_specs, out_specs, out_shape, name):
        params = None
        if plgpu is not None and not interpret:
            params = plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              compiler_params=params, interpret=interpret, name=name)

    def check(q, k, v):
        length, heads, kv_heads = q.shape[1], q.shape[2], k.shape[2]
        if length % config.length_multiple:
            raise ValueError(f"pallas_flash: the text length {length} must be a multiple of "
                             f"{config.length_multiple} (the blocks of config {config})")
        if heads % kv_heads or k.shape[1] != num_prefix + length or v.shape[:3] != k.shape[:3]:
            raise ValueError(f"pallas_flash: q {q.shape}, k {k.shape}, v {v.shape}: need {num_prefix} prefix + "
                             f"{length} text keys and query heads a multiple of the KV heads")
        if num_prefix % config.key_multiple:
            raise ValueError(f"pallas_flash: {num_prefix} prefix keys are not a whole number of key blocks of "
                             f"config {config}")

    def forward(q, k, v, segments, window):
        check(q, k, v)
        batch, length, heads, dk = q.shape
        dv, group = v.shape[-1], heads // k.shape[2]
        cfg = config.forward
        bq, bk, nq = cfg.block_q, cfg.block_k, length // cfg.block_q
        nm = num_prefix // bk
        seg = segments is not None
        qblock = lambda p: nq - 1 - p                       # heaviest (latest) query blocks first

        def kernel(q_ref, k_ref, v_ref, window_ref, *refs):
            qs_ref, ks_ref, o_ref, lse_ref = refs if seg else (None, None) + refs
            i = qblock(pl.program_id(0))
            window = window_ref[()]
            qb = q_ref[...]
            qpos = (i * bq + jnp.arange(bq))[:, None]
            qseg = qs_ref[...][:, None] if seg else None

            def body(masked, j, carry, prefix=False):       # j: a prefix block, or a text block
                m, l, acc = carry
                at = _rows(j if prefix else nm + j, bk)
                s = _masked_scores(qb, k_ref[at, :], scale2, masked,
                                   lambda: _visible(qpos, (j * bk + jnp.arange(bk))[None, :], window),
                                   qseg == ks_ref[_rows(j, bk)][None, :] if seg and not prefix else None)
                m_new = jnp.maximum(m, s.max(axis=1))
                p = jnp.exp2(s - m_new[:, None])
                alpha = jnp.exp2(m - m_new)
                acc = acc * alpha[:, None] + jnp.dot(p.astype(v_ref.dtype), v_ref[at, :],
                                                     preferred_element_type=jnp.float32)
                return m_new, l * alpha + p.sum(axis=1), acc

            init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
                    jnp.zeros((bq, dv), jnp.float32))
            init = jax.lax.fori_loop(0, nm, lambda j, c: body(False, j, c, prefix=True), init) if nm else init
            m, l, acc = _sweep(_key_blocks(i, bq, bk, window), body, init)
            o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
            lse_ref[...] = (m + jnp.log2(l)) / LOG2E

        grid = (nq, heads, batch)
        keys = k.shape[1]
        in_specs = [pl.BlockSpec((None, bq, None, dk), lambda p, h, b: (b, qblock(p), h, 0)),
                    pl.BlockSpec((None, keys, None, dk), lambda p, h, b: (b, 0, h // group, 0)),
                    pl.BlockSpec((None, keys, None, dv), lambda p, h, b: (b, 0, h // group, 0)),
                    pl.BlockSpec((), lambda p, h, b: ())]
        if seg:
            in_specs += [pl.BlockSpec((None, bq), lambda p, h, b: (b, qblock(p))),
                         pl.BlockSpec((None, length), lambda p, h, b: (b, 0))]
        out_specs = [pl.BlockSpec((None, bq, None, dv), lambda p, h, b: (b, qblock(p), h, 0)),
                     pl.BlockSpec((None, None, bq), lambda p, h, b: (b, h, qblock(p)))]
        out_shape = [jax.ShapeDtypeStruct(q.shape[:3] + (dv,), q.dtype),
                     jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)]
        args = (q, k, v, window) + ((segments.astype(jnp.int32),) * 2 if seg else ())
        return tuple(call(kernel, cfg, grid, in_specs, out_specs, out_shape, "hymba_flash_fwd")(*args))

    def backward(q, k, v, segments, window, out, lse, dout):
        check(q, k, v)
        dq, d = _dq(q, k, v, segments, window, out, lse, dout)
        dk, dv = _dkv(q, k, v, segments, window, lse, d, dout)
        return dq, dk, dv

    def _dq(q, k, v, segments, window, out, lse, dout):
        """dq (B, T, H, dk) in q's dtype and D = rowsum(dout * out) (B, H, T) fp32."""
        batch, length, heads, dk = q.shape
        dv, group = v.shape[-1], heads // k.shape[2]
        cfg = config.dq
        bq, bk, nq = cfg.block_q, cfg.block_k, length // cfg.block_q
        nm = num_prefix // bk
        seg = segments is not None
        qblock = lambda p: nq - 1 - p

        def kernel(q_ref, k_ref, v_ref, window_ref, *refs):
            qs_ref, ks_ref, do_ref, o_ref, lse_ref, dq_ref, d_ref = refs if seg else (None, None) + refs
            i = qblock(pl.program_id(0))
            window = window_ref[()]
            qb, do = q_ref[...], do_ref[...]
            qpos = (i * bq + jnp.arange(bq))[:, None]
            qseg = qs_ref[...][:, None] if seg else None
            lse2 = (lse_ref[...] * LOG2E)[:, None]
            d_i = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=1)
            d_ref[...] = d_i

            def body(masked, j, acc, prefix=False):         # j: a prefix block, or a text block
                at = _rows(j if prefix else nm + j, bk)
                kb, vb = k_ref[at, :], v_ref[at, :]
                s = _masked_scores(qb, kb, scale2, masked,
                                   lambda: _visible(qpos, (j * bk + jnp.arange(bk))[None, :], window),
                                   qseg == ks_ref[_rows(j, bk)][None, :] if seg and not prefix else None)
                p = jnp.exp2(s - lse2)
                dp = jax.lax.dot_general(do, vb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                ds = (p * (dp - d_i[:, None])).astype(kb.dtype)
                return acc + jnp.dot(ds, kb, preferred_element_type=jnp.float32)

            acc = jnp.zeros((bq, dk), jnp.float32)
            acc = jax.lax.fori_loop(0, nm, lambda j, c: body(False, j, c, prefix=True), acc) if nm else acc
            acc = _sweep(_key_blocks(i, bq, bk, window), body, acc)
            dq_ref[...] = (acc * scale).astype(dq_ref.dtype)

        grid = (nq, heads, batch)
        rows = lambda width: pl.BlockSpec((None, bq, None, width), lambda p, h, b: (b, qblock(p), h, 0))
        stat = pl.BlockSpec((None, None, bq), lambda p, h, b: (b, h, qblock(p)))
        keys = k.shape[1]
        in_specs = [rows(dk), pl.BlockSpec((None, keys, None, dk), lambda p, h, b: (b, 0, h // group, 0)),
                    pl.BlockSpec((None, keys, None, dv), lambda p, h, b: (b, 0, h // group, 0)),
                    pl.BlockSpec((), lambda p, h, b: ())]
        if seg:
            in_specs += [pl.BlockSpec((None, bq), lambda p, h, b: (b, qblock(p))),
                         pl.BlockSpec((None, length), lambda p, h, b: (b, 0))]
        in_specs += [rows(dv), rows(dv), stat]
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)]
        args = (q, k, v, window) + ((segments.astype(jnp.int32),) * 2 if seg else ()) + (dout, out, lse)
        return tuple(call(kernel, cfg, grid, in_specs, [rows(dk), stat], out_shape, "hymba_flash_dq")(*args))

    def _dkv(q, k, v, segments, window, lse, d, dout):
        """dk (B, P + T, KV, dk) and dv (B, P + T, KV, dv) in k's and v's dtypes, summed over each GQA
        group."""
        batch, length, heads, dk = q.shape
        kv_heads, dv = k.shape[2], v.shape[-1]
        group = heads // kv_heads
        cfg = config.dkv
        bq, bk, nq = cfg.block_q, cfg.block_k, length // cfg.block_q
        nm, nt = num_prefix // bk, length // bk
        seg = segments is not None
        prefix_programs = nm * kv_heads * batch

        def program(p):
            """(key block of [prefix | text], KV head, row) of program p: the prefix blocks' programs (each
            walks every query block: the heaviest) first, then the text blocks', key block fastest."""
            i32 = lambda x: jnp.asarray(x, jnp.int32)        # as in the kernel's bounds below
            prefix = p < prefix_programs
            r = p - jnp.where(prefix, i32(0), i32(prefix_programs))
            n = jnp.where(prefix, i32(max(nm, 1)), i32(nt))
            rest = jax.lax.div(r, n)                        # all non-negative: truncation is floor
            block = jax.lax.rem(r, n) + jnp.where(prefix, i32(0), i32(nm))
            return block, jax.lax.rem(rest, i32(kv_heads)), jax.lax.div(rest, i32(kv_heads))

        def kernel(q_ref, k_ref, v_ref, window_ref, *refs):
            qs_ref, ks_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref = refs if seg else (None, None) + refs
            block, g, _ = program(pl.program_id(0))
            window = window_ref[()]
            j, first_head = block - nm, g * group           # j < 0: a prefix block
            kb, vb = k_ref[...], v_ref[...]
            kpos = (j * bk + jnp.arange(bk))[:, None]
            kseg = ks_ref[...][:, None] if seg else None
            text = _query_blocks(jnp.maximum(j, 0), bq, bk, nq, window)
            # (Python scalars in jnp.where lower to the wrong Triton type here: int32 arrays.)
            bounds = tuple(jnp.where(j < 0, jnp.asarray(every, jnp.int32), jnp.asarray(band, jnp.int32))
                           for every, band in zip((0, 0, nq, nq), text))

            def head(g, carry):
                h = first_head + g

                def body(masked, i, carry):
                    dk_acc, dv_acc = carry
                    at = _rows(i, bq)
                    qb, do = q_ref[at, h, :], do_ref[at, h, :]
                    st = _masked_scores(kb, qb, scale2, masked,                          # (bk, bq)
                                        lambda: _visible((i * bq + jnp.arange(bq))[None, :], kpos, window),
                                        # prefix keys (j < 0) are in every document
                                        (kseg == qs_ref[at][None, :]) | (j < 0) if seg else None)
                    pt = jnp.exp2(st - (lse_ref[h, at] * LOG2E)[None, :])
                    dv_acc = dv_acc + jnp.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
                    dpt = jax.lax.dot_general(vb, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                    dst = (pt * (dpt - d_ref[h, at][None, :])).astype(qb.dtype)
                    return dk_acc + jnp.dot(dst, qb, preferred_element_type=jnp.float32), dv_acc

                return _sweep(bounds, body, carry)

            init = (jnp.zeros((bk, dk), jnp.float32), jnp.zeros((bk, dv), jnp.float32))
            dk_acc, dv_acc = jax.lax.fori_loop(0, group, head, init)
            dk_ref[...] = (dk_acc * scale).astype(dk_ref.dtype)
            dv_ref[...] = dv_acc.astype(dv_ref.dtype)

        grid = (prefix_programs + nt * kv_heads * batch,)

        def key_rows(p):
            block, g, b = program(p)
            return b, block, g, 0

        def key_segments(p):
            block, _, b = program(p)
            return b, jnp.maximum(block - nm, 0)

        keys = lambda width: pl.BlockSpec((None, bk, None, width), key_rows)
        # every query head and row (whole-array blocks), indexed by the group's heads in the kernel
        group_all = lambda width: pl.BlockSpec((None, length, heads, width), lambda p: (program(p)[2], 0, 0, 0))
        stat = pl.BlockSpec((None, heads, length), lambda p: (program(p)[2], 0, 0))
        in_specs = [group_all(dk), keys(dk), keys(dv), pl.BlockSpec((), lambda p: ())]
        if seg:
            in_specs += [pl.BlockSpec((None, length), lambda p: (program(p)[2], 0)),
                         pl.BlockSpec((None, bk), key_segments)]
        in_specs += [group_all(dv), stat, stat]
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
        args = (q, k, v, window) + ((segments.astype(jnp.int32),) * 2 if seg else ()) + (dout, lse, d)
        return tuple(call(kernel, cfg, grid, in_specs, [keys(dk), keys(dv)], out_shape, "hymba_flash_dkv")(*args))

    return FlashPart(forward, backward)


def flash_attention(q, k, v, prefix, segments, window, *, scale: float,
                    config: FlashConfig = DEFAULT_CONFIG, interpret: bool = False) -> jax.Array:
    """The 'pallas_flash' backend: q (B, T, H, dk) over the prefix (k, v) (B|1, P, KV, d) or None and the
    text keys k (B, T, KV, dk), v (B, T, KV, dv), causal within `window` (an int or an int32 scalar array
    known at run time; None: global, the kernels' window is then the text length), documents apart by
    `segments` (B, T) or None. Returns (B, T, H, dv) in q's dtype.

    A prefix of whole key blocks (the 1.5B's 128 meta tokens) goes into the kernels before the text keys
    ([P | T], broadcast to the batch; its gradients summed over the batch in fp32 by autodiff): on the H200
    that layer is 1.4-1.6x faster than with the prefix in XLA merged through the log-sum-exp
    (docs/performance.md), which remains for prefixes of other lengths."""
    window = jnp.asarray(q.shape[1] if window is None else window, jnp.int32)
    if prefix is None or prefix[0].shape[1] % config.key_multiple:
        text = flash_gpu_part(scale=scale, config=config, interpret=interpret)
        return merged_attention(text, None if prefix is None else xla_prefix_part(scale), q, k, v, prefix, segments,
                                window)
    batch = q.shape[0]
    joined = lambda p, t: jnp.concatenate(
        [jnp.broadcast_to(p.astype(jnp.float32), (batch,) + p.shape[1:]).astype(t.dtype), t], axis=1)
    part = flash_gpu_part(scale=scale, config=config, num_prefix=prefix[0].shape[1], interpret=interpret)
    return merged_attention(part, None, q, joined(prefix[0], k), joined(prefix[1], v), None, segments, window)
