"""The chunked and fused (Pallas, in interpret mode) scan backends against the 'sequential' reference:
values and gradients of every input, with resets, an initial state and a length that is not a multiple
of the chunk, in fp32 and with bf16 inputs.

Tolerances (relative norm error ||got - ref|| / ||ref||): fp32 5e-6. Every backend computes the same
fp32 arithmetic as the reference in another order (a parallel scan or chunked recurrences, sums over the
state in other orders); that reorders roundings of ~6e-8 over recurrences a few tens of steps deep, and the
measured errors are 1e-7 to 7e-7, while any wrong term (a missing reset, an off-by-one step, a dropped
gradient path) gives errors of order 1e-2 to 1. bf16 inputs: the arithmetic is still fp32, but y and the
input gradients are rounded to bf16 at the end, so the two sides differ by at most one bf16 ulp (2^-8)
where they round differently: 4e-3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hymba_jax.ops import scan_chunked, scan_fused, scan_pallas_gpu, scan_pallas_tpu
from hymba_jax.ops.scan import available_backends, selective_scan
from hymba_jax.ops.scan_fused import Canon

BATCH, LENGTH, WIDTH, STATE = 2, 21, 16, 4      # length 21: not a multiple of the chunk (8)
BACKENDS = {
    "chunked": scan_chunked.with_chunk(8),
    # the gradient path keeps states every 4 steps, the forward-only path unrolls 8
    "pallas_gpu": scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=8, block_d=8, interpret=True),
    # 4-lane tiles, 3 per block: blocks of 12 channels, the last one partial (16 = 12 + 4); the forward's
    # grid steps take 2 chunks of 4 (6 chunks)
    "pallas_tpu": scan_pallas_tpu.with_kernels(chunk=4, lanes=4, sublanes=3, interpret=True),
}
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state")


def make_inputs(seed: int, dtype, h0_batch: int, state: int = STATE):
    ks = jax.random.split(jax.random.key(seed), 10)
    normal = lambda k, shape, dt=dtype: jax.random.normal(k, shape, jnp.float32).astype(dt)
    x = normal(ks[0], (BATCH, LENGTH, WIDTH))
    dt = normal(ks[1], (BATCH, LENGTH, WIDTH))
    A = -jnp.exp(normal(ks[2], (WIDTH, state), jnp.float32))
    B, C = normal(ks[3], (BATCH, LENGTH, state)), normal(ks[4], (BATCH, LENGTH, state))
    D = normal(ks[5], (WIDTH,), jnp.float32)
    z = normal(ks[6], (BATCH, LENGTH, WIDTH))
    bias = normal(ks[7], (WIDTH,), jnp.float32)
    reset = (jnp.zeros((BATCH, LENGTH), bool).at[0, 5].set(True).at[0, 13].set(True).at[1, 8].set(True))
    h0 = normal(ks[9], (h0_batch, WIDTH, state), jnp.float32)
    return (x, dt, A, B, C, D, z, bias, h0), reset


def value_and_grads(fn):
    """(y, last, grads of all 9 inputs) of a random projection of both outputs."""

    def loss(x, dt, A, B, C, D, z, bias, h0, reset):
        y, last = fn(x, dt, A, B, C, D, z, bias, reset, h0)
        wy = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
        wl = jnp.cos(jnp.arange(last.size, dtype=jnp.float32)).reshape(last.shape)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(last * wl), (y, last)

    grad = jax.grad(loss, argnums=tuple(range(9)), has_aux=True)
    return jax.jit(lambda inputs, reset: grad(*inputs, reset))


def sequential(x, dt, A, B, C, D, z, bias, reset, h0):
    return selective_scan(x, dt, A, B, C, D, z, bias, reset=reset, initial_state=h0, backend="sequential")


def rel(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def reference():
    return value_and_grads(sequential)


def test_backends_registered():
    assert {"associative", "sequential", "chunked", "pallas_gpu", "pallas_tpu"} <= set(
        available_backends())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("dtype,h0_batch,tol", [(jnp.float32, BATCH, 5e-6), (jnp.bfloat16, 1, 4e-3)],
                         ids=["fp32", "bf16-shared-h0"])
def test_matches_sequential(reference, backend, dtype, h0_batch, tol):
    inputs, reset = make_inputs(0, dtype, h0_batch)
    grads, (y, last) = value_and_grads(BACKENDS[backend])(inputs, reset)
    ref_grads, (ref_y, ref_last) = reference(inputs, reset)
    assert y.dtype == dtype and y.shape == (BATCH, LENGTH, WIDTH)
    assert last.dtype == jnp.float32 and last.shape == (BATCH, WIDTH, STATE)
    assert rel(y, ref_y) < tol
    assert rel(last, ref_last) < 5e-6
    for name, g, ref_g in zip(NAMES, grads, ref_grads):
        assert g.shape == ref_g.shape and g.dtype == ref_g.dtype, name
        assert float(jnp.linalg.norm(ref_g.astype(jnp.float32))) > 0, name
        assert rel(g, ref_g) < (5e-6 if g.dtype == jnp.float32 else tol), name


def test_pallas_gpu_pads_a_state_size_that_is_not_a_power_of_two(reference):
    """Triton tiles are powers of two: N = 3 runs padded to 4 (`pow2_state_kernels`) and is cut back, exactly."""
    inputs, reset = make_inputs(0, jnp.float32, BATCH, state=3)
    grads, (y, last) = value_and_grads(BACKENDS["pallas_gpu"])(inputs, reset)
    ref_grads, (ref_y, ref_last) = reference(inputs, reset)
    assert last.shape == (BATCH, WIDTH, 3)
    for got, want in zip((y, last, *grads), (ref_y, ref_last, *ref_grads)):
        assert got.shape == want.shape and rel(got, want) < 5e-6


def test_pallas_gpu_default_kernels_on_a_small_grid(reference):
    """The default tiles (32 channels per program, the backward's time segments chosen by grid size) on
    2 rows x 64 channels: the forward alone, the forward with its chunk-start states and the segmented
    backward all equal the reference."""
    width = 64
    fn = scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=8, interpret=True)
    inputs, reset = make_inputs(2, jnp.float32, BATCH)
    x, dt, A, B, C, D, z, bias, h0 = inputs
    wide = lambda t: jnp.tile(t, (1,) * (t.ndim - 1) + (width // WIDTH,))
    inputs = (wide(x), wide(dt), jnp.tile(A, (width // WIDTH, 1)), B, C, wide(D), wide(z), wide(bias),
              jnp.tile(h0, (1, width // WIDTH, 1)))
    grads, (y, last) = value_and_grads(fn)(inputs, reset)
    ref_grads, (ref_y, ref_last) = value_and_grads(sequential)(inputs, reset)
    y_alone, _ = jax.jit(fn)(*inputs[:8], reset, inputs[8])
    assert rel(y, ref_y) < 5e-6 and rel(y_alone, ref_y) < 5e-6 and rel(last, ref_last) < 5e-6
    for name, g, ref_g in zip(NAMES, grads, ref_grads):
        assert rel(g, ref_g) < 5e-6, name


def test_pallas_gpu_backward_reduce_scatters_the_state_input_gradients():
    """dB and dC: the backward's sums over a program's channels, as one reduce-scattered row per step
    (`_channel_sums`, shuffles emulated in interpret mode) wherever 2N = bD; on a GPU only for one channel
    per lane (32 channels, one warp). The backends above take it (N 4, 8 channels), and a smaller grid's
    16 channels the columns (test above)."""
    keys = jax.random.split(jax.random.key(3), 2)
    p_terms, q_terms = (jax.random.normal(k, (16, 32), jnp.float32) for k in keys)
    row, misplaced = scan_pallas_gpu._channel_sums(p_terms, q_terms, interpret=True)
    want = jnp.concatenate([p_terms.sum(1), q_terms.sum(1)])[None]
    assert row.shape == (1, 32) and rel(row, want) < 1e-6 and not misplaced.any()
    scatters = lambda n, block, interpret, warps=1: scan_pallas_gpu._scatters_sums(
        dict(interpret=interpret, num_warps=warps), n, block)
    assert scatters(16, 32, False) and scatters(4, 8, True)
    assert not scatters(4, 8, False) and not scatters(16, 32, False, warps=2) and not scatters(8, 32, True)


def test_pallas_gpu_spells_out_multiply_adds():
    """The GPU kernels' multiply-adds are one `fma.rn.f32` each (the H200's jax compiles with Triton's FP
    fusion off), a*b + c in interpret mode; `_state_dot`, the sums over states, chains them over blocks of
    rows: the sum of the products for any power-of-two state size, a column against a tile as the kernels
    call it."""
    for n in (1, 2, 4, 16):
        keys = jax.random.split(jax.random.key(n), 2)
        tile, column = jax.random.normal(keys[0], (n, 32)), jax.random.normal(keys[1], (n, 1))
        got = scan_pallas_gpu._state_dot(tile, column, lambda a, b, c: a * b + c)
        assert got.shape == (1, 32) and rel(got, jnp.sum(tile * column, axis=0, keepdims=True)) < 1e-6, n
    program = str(jax.make_jaxpr(lambda a, b: scan_pallas_gpu._fma(a, b, 1.0, interpret=False))(
        jnp.ones((16, 32)), jnp.ones((16, 1))))
    assert "fma.rn.f32" in program
    assert "inline_asm" not in str(jax.make_jaxpr(lambda a: scan_pallas_gpu._fma(a, a, a, interpret=True))(
        jnp.ones((16, 32))))


def test_fast_softplus_and_sigmoid_against_float64():
    """The fast forms the kernels take with bf16 inputs (`fast_math`): log1p on [0, 1] as 2 atanh(e / (2 + e))
    by its series (`log1p_unit`) within 3e-7 of float64; softplus and sigmoid from exp2 within 2.5e-6 over
    [-30, 30] (the rounding of -|v| log2(e), amplified by the exponent), from 0 to 1 at the far ends. The
    exact forms (no reciprocal) stay within 3e-7. On the GPU the reciprocal is one `rcp.approx.ftz.f32`."""
    reciprocal = lambda v: 1.0 / v
    e = jnp.linspace(0.0, 1.0, 100001, dtype=jnp.float32)[1:]
    want = np.log1p(np.asarray(e, np.float64))
    assert np.max(np.abs(np.asarray(scan_fused.log1p_unit(e, reciprocal), np.float64) / want - 1)) < 3e-7
    v = jnp.linspace(-30.0, 30.0, 100001, dtype=jnp.float32)
    v64 = np.asarray(v, np.float64)
    exact = dict(softplus=np.logaddexp(0.0, v64), sigmoid=1.0 / (1.0 + np.exp(-v64)))
    for name, fn in (("softplus", scan_fused.softplus), ("sigmoid", scan_fused.sigmoid)):
        for rcp, tol in ((reciprocal, 2.5e-6), (None, 3e-7)):
            got = np.asarray(fn(v, rcp), np.float64)
            assert np.max(np.abs(got / exact[name] - 1)) < tol, (name, rcp)
    assert float(scan_fused.sigmoid(jnp.float32(-200.0), reciprocal)) == 0.0
    assert float(scan_fused.softplus(jnp.float32(-200.0), reciprocal)) == 0.0
    io = scan_pallas_gpu._IO({"x": jnp.zeros((1, 1), jnp.bfloat16)}, 0, False)
    assert io.fast and not scan_pallas_gpu._IO({"x": jnp.zeros((1, 1), jnp.float32)}, 0, False).fast
    assert "rcp.approx.ftz.f32" in str(jax.make_jaxpr(io.reciprocal)(jnp.ones((16, 32))))


def test_pallas_gpu_splits_time_into_segments_on_small_grids(reference):
    """Forward and backward run grids (rows, channel blocks, time segments): the state entering each
    forward segment found first by `state_chunk` over the earlier segments, the adjoint at each backward
    segment's end by `adjoint_chunk` over the later ones (and, with an initial state, its gradient from
    the adjoints entering the document starts). By default the fewest power-of-two segments that divide
    the chunks and reach SEGMENT_GRID (FORWARD_SEGMENT_GRID) programs. One, two and four segments give the
    reference, with resets inside segments (two in one at two segments: only the later one sees the
    adjoint from beyond it) and at a segment's first step, and an initial state."""
    def segments(batch, width, n_chunks, kind="", **cfg):
        defaults = dict(block_d=None, segments=None, segment_grid=scan_pallas_gpu.SEGMENT_GRID,
                        forward_segments=None, forward_segment_grid=scan_pallas_gpu.FORWARD_SEGMENT_GRID)
        return scan_pallas_gpu._segments(dict(defaults, **cfg), batch, width, n_chunks, kind)

    assert segments(8, 3200, 512) == (32, 16) and segments(4, 3200, 1024) == (32, 32)
    assert segments(8, 3200, 512, "forward_") == (32, 8) and segments(4, 3200, 1024, "forward_") == (32, 16)
    assert segments(1, 3200, 2048) == (32, 128) and segments(1, 3200, 6) == (32, 2)    # 6 chunks: 2 divide
    assert segments(128, 3200, 512) == (32, 1)                                          # 12,800 already
    assert segments(4, 3200, 1024, block_d=16, segments=4) == (16, 4)
    assert segments(8, 3200, 512, "forward_", forward_segment_grid=1600) == (32, 2)
    assert segments(8, 3200, 512, "forward_", forward_segments=1) == (32, 1)
    with pytest.raises(ValueError, match="segments=4: must divide the 6 chunks"):
        segments(1, 32, 6, segments=4)
    with pytest.raises(ValueError, match="forward_segments=4: must divide the 6 chunks"):
        segments(1, 32, 6, "forward_", forward_segments=4)
    inputs, reset = make_inputs(4, jnp.float32, BATCH)
    ref_grads, (ref_y, ref_last) = reference(inputs, reset)
    for count in (1, 2, 4):                 # LENGTH 21, padded to 32 (inference_chunk): 8 chunks of 4
        fn = scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=16, block_d=8, segments=count,
                                          forward_segments=count, interpret=True)
        grads, (y, last) = value_and_grads(fn)(inputs, reset)
        assert rel(y, ref_y) < 5e-6 and rel(last, ref_last) < 5e-6
        for name, g, ref_g in zip(NAMES, grads, ref_grads):
            assert rel(g, ref_g) < 5e-6, (count, name)
    # the forward alone: padded to 24, 6 chunks of 4 in 2 segments (a reset at step 13 in the second)
    fn = scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=4, block_d=8, forward_segments=2, interpret=True)
    y, last = jax.jit(fn)(*inputs[:8], reset, inputs[8])
    assert rel(y, ref_y) < 5e-6 and rel(last, ref_last) < 5e-6


def test_pallas_gpu_forward_alone_splits_time_only_on_small_grids(reference):
    """Without a backward pass the forward runs whole on a grid of INFERENCE_GRID programs or more (8 x 2048 x
    3200: 800), in two segments on half that (4 x 4096) if they fit in one WAVE, the second one's entry state
    carried across the pieces FORWARD_SEGMENT_GRID asks for, and in those pieces otherwise; with a backward
    always in the pieces. 2 rows x 2 channel blocks (4 programs), 12 chunks of 2 steps, 4 pieces (resets at
    steps 5 and 13 of row 0, 8 of row 1: in pieces 0, 2 and 1): whole, 2 segments of 2 pieces, 4 segments (a
    grid too small, or 2 segments that take two waves), all the reference."""
    inputs, reset = make_inputs(3, jnp.float32, BATCH)
    ref_grads, (ref_y, ref_last) = reference(inputs, reset)
    for inference_grid, wave, segments in ((4, 8, 1), (8, 8, 2), (8, 7, 4), (16, 64, 4)):
        fn = scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=2, block_d=8, forward_segment_grid=16,
                                          inference_grid=inference_grid, wave=wave, interpret=True)
        y, last = jax.jit(fn)(*inputs[:8], reset, inputs[8])
        assert rel(y, ref_y) < 5e-6 and rel(last, ref_last) < 5e-6, segments
        grids = _kernel_grids(jax.make_jaxpr(fn)(*inputs[:8], reset, inputs[8]).jaxpr)
        time_axis = (segments,) if segments > 1 else ()
        assert grids["selective_scan_forward"] == (BATCH, 2) + time_axis, segments
        # the entry pass: one program per piece before the last segment
        assert grids.get("selective_scan_segment_states") == (
            None if segments == 1 else (BATCH, 2, 4 - 4 // segments)), segments
        # with a backward (6 chunks of 4 steps): 2 segments whatever inference_grid, the entry pass over the first
        grids = _kernel_grids(jax.make_jaxpr(value_and_grads(fn))(inputs, reset).jaxpr)
        assert grids["selective_scan_forward"] == (BATCH, 2, 2) and grids["selective_scan_segment_states"] == (BATCH, 2)


@pytest.mark.parametrize("lookahead", [0, 1, 4, 6])
def test_pallas_gpu_loads_columns_ahead_across_chunks(reference, lookahead):
    """Every pass reads each step's B and C columns `lookahead` steps of its walk before the step (`_Columns`),
    the last steps' loads reaching into the next chunk: forward, from the last chunk back in the adjoint pass.
    0 loads at the step, 4 a whole chunk ahead, 6 is capped at the chunk (4). Several chunks per segment
    (2 segments of 4 chunks with a backward, 8 chunks of 4 alone), resets in both: the reference."""
    fn = scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=4, block_d=8, segments=2, forward_segments=2,
                                      column_lookahead=lookahead, inference_column_lookahead=lookahead,
                                      entry_column_lookahead=lookahead, interpret=True)
    inputs, reset = make_inputs(5, jnp.float32, BATCH)
    ref_grads, (ref_y, ref_last) = reference(inputs, reset)
    grads, (y, last) = value_and_grads(fn)(inputs, reset)
    y_alone, last_alone = jax.jit(fn)(*inputs[:8], reset, inputs[8])
    for got, want in ((y, ref_y), (last, ref_last), (y_alone, ref_y), (last_alone, ref_last)):
        assert rel(got, want) < 5e-6
    for name, g, ref_g in zip(NAMES, grads, ref_grads):
        assert rel(g, ref_g) < 5e-6, name


def _kernel_grids(jaxpr) -> dict:
    """{kernel name: grid} of the Pallas calls in a jaxpr, its sub-jaxprs included."""
    grids = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            name = eqn.params.get("name_and_src_info", eqn.params.get("name"))   # the field's name moved in jax
            grids[getattr(name, "name", name)] = tuple(eqn.params["grid_mapping"].grid)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                grids.update(_kernel_grids(inner))
    return grids


def test_pallas_gpu_many_segments_stay_within_1e6_of_float64():
    """Carrying states and adjoints across 64 one-chunk segments (the segment products as one exp of the
    summed deltas, dh0 from the adjoints entering the starts) keeps fp32 within 1e-6 of the float64
    recurrence, as one segment does: y, the last state and all nine gradients. Two documents start in
    adjacent steps (one chunk) and one at a segment's first step. (The H200 check against fp32 'sequential'
    at 1 x 1024 x 320, 256 segments, reads dA 1.3e-6: that is the reference's own error, 9.6e-7 from float64
    in the same computation on the CPU, where the kernel's is 2.2e-7.)"""
    length, width, state = 256, 8, 4
    ks = jax.random.split(jax.random.key(3), 10)
    normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
    inputs = (normal(ks[0], (1, length, width)), normal(ks[1], (1, length, width)) - 2.0,
              -jnp.exp(normal(ks[2], (width, state))), normal(ks[3], (1, length, state)),
              normal(ks[4], (1, length, state)), normal(ks[5], (width,)), normal(ks[6], (1, length, width)),
              0.5 * normal(ks[7], (width,)), normal(ks[8], (1, width, state)))
    reset = jnp.zeros((1, length), bool).at[0, 37].set(True).at[0, 38].set(True).at[0, 152].set(True)
    with jax.enable_x64(True):
        ref_grads, (ref_y, ref_last) = value_and_grads(sequential)(
            [v.astype(jnp.float64) for v in inputs], reset)
        for count in (1, 64):                               # 64 chunks of 4
            fn = scan_pallas_gpu.with_kernels(chunk=4, inference_chunk=4, block_d=8, segments=count,
                                              forward_segments=count, interpret=True)
            grads, (y, last) = value_and_grads(fn)(inputs, reset)
            assert rel(y, ref_y) < 1e-6 and rel(last, ref_last) < 1e-6, count
            for name, g, ref_g in zip(NAMES, grads, ref_grads):
                assert rel(g, ref_g) < 1e-6, (count, name, rel(g, ref_g))


def test_pallas_gpu_flags_the_chunks_where_documents_start():
    """The forward, entry-state and adjoint passes branch per chunk on whether a document starts in it
    (`_per_chunk`): chunks without one run code with no restart selects. The flags are the resets' maximum
    over each chunk; the tests above run both branches (make_inputs' resets at steps 5 and 13 of row 0 and 8
    of row 1: a start in some chunks of 4 and 8, none in the others)."""
    _, reset = make_inputs(0, jnp.float32, BATCH)
    reset = jnp.pad(reset.astype(jnp.float32), ((0, 0), (0, 3)))[..., None]      # 24 steps
    rows, cols = jnp.zeros((BATCH, 24, WIDTH)), jnp.zeros((BATCH, 24, STATE))
    canon = Canon(rows, rows, None, cols, cols, reset, jnp.zeros((STATE, WIDTH)),
                  jnp.zeros((1, WIDTH)), jnp.zeros((1, WIDTH)), None)
    flags = lambda chunk: dict(zip(*scan_pallas_gpu._inputs(canon, chunk)))["chunk_starts"][..., 0].tolist()
    assert flags(4) == [[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert flags(8) == [[1, 1, 0], [0, 1, 0]]
    assert "chunk_starts" not in scan_pallas_gpu._inputs(canon)[0]              # the backward takes no branch


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_decays_take_exp2_only_for_inputs_narrower_than_fp32(backend):
    """bf16 inputs: the kernels' decays are exp2 (one instruction on a GPU; about 3e-6 from 'sequential' in
    the gradients on the H200, far below a bf16 ulp); fp32 inputs keep the exact exp (<= 1e-6). On the CPU
    both are exact, so the values cannot tell them apart: the kernels' programs can."""
    for dtype, fast in ((jnp.bfloat16, True), (jnp.float32, False)):
        inputs, reset = make_inputs(0, dtype, BATCH)
        program = str(jax.make_jaxpr(value_and_grads(BACKENDS[backend]))(inputs, reset))
        assert (" exp2 " in program) == fast, dtype


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_resets_without_initial_state_match_sequential(backend):
    """As training calls the scan: resets, no initial state (documents start from zeros; the fused
    kernels then keep no initial state or its gradient). Outputs and the 8 gradients equal the reference."""
    (x, dt, A, B, C, D, z, bias, _), reset = make_inputs(5, jnp.float32, BATCH)

    def grads(fn):
        def loss(*args):
            y, last = fn(*args, reset, None)
            return jnp.sum(y * jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)) + jnp.sum(last)
        return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))(x, dt, A, B, C, D, z, bias)

    (value, got), (ref_value, want) = grads(BACKENDS[backend]), grads(sequential)
    assert abs(value - ref_value) <= 5e-6 * abs(ref_value)
    for name, g, ref_g in zip(NAMES, got, want):
        assert rel(g, ref_g) < 5e-6, name


def test_resets_restart_from_initial_state():
    """A document after a reset gives what it gives alone from the initial state (every backend)."""
    inputs, _ = make_inputs(1, jnp.float32, BATCH)
    x, dt, A, B, C, D, z, bias, h0 = inputs
    reset = jnp.zeros((BATCH, LENGTH), bool).at[:, 9].set(True)
    for name, fn in BACKENDS.items():
        y, last = fn(x, dt, A, B, C, D, z, bias, reset, h0)
        alone, alone_last = fn(*(t[:, 9:] for t in (x, dt)), A, *(t[:, 9:] for t in (B, C)), D, z[:, 9:],
                               bias, None, h0)
        assert rel(y[:, 9:], alone) < 5e-6, name
        assert rel(last, alone_last) < 5e-6, name


def test_optional_arguments():
    """No gate, no bias, no resets, no initial state (zeros): still the reference."""
    inputs, _ = make_inputs(2, jnp.float32, BATCH)
    x, dt, A, B, C, D, _, _, _ = inputs
    ref_y, ref_last = sequential(x, dt, A, B, C, D, None, None, None, None)
    for name, fn in BACKENDS.items():
        y, last = fn(x, dt, A, B, C, D, None, None, None, None)
        assert rel(y, ref_y) < 5e-6 and rel(last, ref_last) < 5e-6, name


def test_pallas_tpu_chunks_must_be_powers_of_two():
    with pytest.raises(ValueError, match="chunk=24: must be a power of two"):
        scan_pallas_tpu.kernels(chunk=24)
    with pytest.raises(ValueError, match="forward_chunks=3: must be a power of two"):
        scan_pallas_tpu.kernels(forward_chunks=3)


def test_pallas_gpu_chunks_must_be_powers_of_two():
    with pytest.raises(ValueError, match="chunk=6: must be a power of two"):
        scan_pallas_gpu.kernels(chunk=6)
    with pytest.raises(ValueError, match="inference_chunk=12: must be a power of two"):
        scan_pallas_gpu.kernels(inference_chunk=12)


SHARDED_SCAN = """
import json
import jax, jax.numpy as jnp, numpy as np
from hymba_jax.ops import scan_pallas_gpu, scan_pallas_tpu
from hymba_jax.parallel import DEFAULT_AXIS_RULES, make_mesh, sharding_context

mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
ks = jax.random.split(jax.random.key(3), 10)
b, l, d, n = 4, 21, 64, 4
normal = lambda k, shape: jax.random.normal(k, shape, jnp.float32)
x, dt, z = normal(ks[0], (b, l, d)), normal(ks[1], (b, l, d)), normal(ks[2], (b, l, d))
A, B, C = -jnp.exp(normal(ks[3], (d, n))), normal(ks[4], (b, l, n)), normal(ks[5], (b, l, n))
D, bias, h0 = normal(ks[6], (d,)), normal(ks[7], (d,)) * 0.5, normal(ks[8], (1, d, n))
reset = jax.random.uniform(ks[9], (b, l)) < 0.1
wy = normal(jax.random.key(4), (b, l, d))
result = {}
for name, backend in (("pallas_gpu", scan_pallas_gpu.with_kernels(chunk=4, block_d=8, interpret=True)),
                      ("pallas_tpu", scan_pallas_tpu.with_kernels(chunk=8, lanes=8, sublanes=2, interpret=True))):
    def loss(x, dt, A, B, C, D, z, bias, h0):
        y, last = backend(x, dt, A, B, C, D, z, bias, reset, h0)
        return jnp.sum(y * wy) + jnp.sum(last ** 2)
    grad = jax.value_and_grad(loss, argnums=tuple(range(9)))
    args = (x, dt, A, B, C, D, z, bias, h0)
    ref_loss, ref_grads = jax.jit(grad)(*args)
    args = jax.device_put(args, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sharded = jax.jit(sharding_context(mesh, DEFAULT_AXIS_RULES)(grad))
    jaxpr = str(jax.make_jaxpr(sharded)(*args))
    got_loss, got_grads = sharded(*args)
    rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
    result[name] = dict(shard_maps=jaxpr.count("shard_map"), loss=rel(got_loss, ref_loss),
                        grads=[rel(g, r) for g, r in zip(got_grads, ref_grads)])
print(json.dumps(result))
"""


def test_kernels_run_per_device_under_a_mesh(tmp_path):
    """On 8 simulated devices (data 2 x tensor 4), inside the sharding context, the Pallas backends run in
    shard_map on each device's rows and channels (a custom call XLA cannot split would otherwise be run
    on the gathered batch on every device); loss and all 9 gradients equal the unsharded ones (fp32; the
    only difference is the order of the cross-device sums of the A, D and dt_bias gradients)."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run([sys.executable, "-c", SHARDED_SCAN], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, r in result.items():
        assert r["shard_maps"] >= 1, (name, r)
        assert r["loss"] < 1e-6 and max(r["grads"]) < 1e-5, (name, r)
