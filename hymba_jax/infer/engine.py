"""Prefill, the decode step and the generation loop over a `Cache`.

One function, `extend`, advances every row of a cache by a chunk of tokens: row b takes its first
`num_real[b]` tokens of the chunk (the rest is padding that changes nothing). Prefill is `extend` over
chunks of the prompts (right-padded, any lengths), a decode step is `extend` with one token, and a row that
has finished takes 0 tokens. Each row only ever sees its own positions, so a batch of ragged prompts gives
every row exactly the tokens it gets alone.

`decode_loop` is a `lax.while_loop` (compiled once per batch size and cache size; not per prompt,
sampling setting or output length) that samples, streams tokens through an optional host callback, and stops at stop tokens
or after `max_new_tokens`. `Generator` strings it together for lists of token prompts.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from hymba_jax.config import HymbaConfig
from hymba_jax.infer.cache import Cache, MetaState, empty_pending, init_cache, meta_state, slot_positions
from hymba_jax.infer.sampling import Sampling, sample
from hymba_jax.model.attention import KV, attention_mask, with_prefix
from hymba_jax.model.block import LayerState
from hymba_jax.model.lm import HymbaForCausalLM

# on_token(step, tokens (B,), emitted (B,) bool): called on the host with every generated token, in order.
TokenCallback = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


def _masks(config: HymbaConfig, cache: Cache, query_pos: jax.Array) -> dict[bool, Optional[jax.Array]]:
    """Attention masks (B, C, M + capacity + C) per layer kind (is_global) over [meta | buffer | chunk]."""
    masks: dict[bool, Optional[jax.Array]] = {True: None, False: None}
    if not config.has_attention:
        return masks
    m = config.num_meta_tokens
    for i in config.kv_owner_layers:
        is_global = config.is_global(i)
        if masks[is_global] is not None:
            continue
        held = slot_positions(cache.lengths, cache.layers[i].kv.k.shape[2] - m)
        key_pos = jnp.concatenate([held, query_pos], axis=1)
        mask = attention_mask(query_pos, key_pos, window=config.attention_window(i))
        mask = mask & (key_pos >= 0)[:, None, :]
        masks[is_global] = with_prefix(mask, m)
    return masks


def _write(buffer: KV, new: KV, positions: jax.Array, num_real: jax.Array, num_meta: int) -> KV:
    """Store the first num_real[b] of new K/V (B, C, ...) of text `positions` (B, C) at their slots; in a
    ring only the last `capacity` of them (earlier ones would be overwritten by the same write)."""
    slots = buffer.k.shape[2]
    capacity = slots - num_meta
    c = jnp.arange(positions.shape[1])[None]
    keep = (c < num_real[:, None]) & (c >= num_real[:, None] - capacity)
    slot = jnp.where(keep, num_meta + jnp.mod(positions, capacity), slots)     # out of range: dropped
    rows = jnp.arange(positions.shape[0])[:, None]
    put = lambda buf, x: buf.at[rows, :, slot].set(x.astype(buf.dtype), mode="drop")
    return KV(put(buffer.k, new.k), put(buffer.v, new.v))


def _flush_pending(config: HymbaConfig, cache: Cache) -> tuple[LayerState, ...]:
    """The buffers with the pending K/V written in."""
    start = cache.lengths - cache.pending_real
    layers = []
    for state, new in zip(cache.layers, cache.pending):
        if new is not None:
            positions = start[:, None] + jnp.arange(new.k.shape[1])[None]
            state = LayerState(_write(state.kv, new, positions, cache.pending_real, config.num_meta_tokens),
                               state.ssm)
        layers.append(state)
    return tuple(layers)


def _chunk_forward(module: HymbaForCausalLM, tokens, positions, masks, prefix, num_real):
    x = module.embed(tokens)
    x, states, _ = module.run_layers(x, positions, masks, None, prefix, num_real)
    return module.final_norm(x), states


def _extend(config: HymbaConfig, params, cache: Cache, tokens: jax.Array, num_real: jax.Array
            ) -> tuple[jax.Array, Cache]:
    """Advance each row b by its first num_real[b] tokens of `tokens` (B, C).

    Returns the final-normed hidden states (B, C, d) (rows' padding positions hold garbage) and the cache
    (the chunk's K/V pending). The caller keeps every row within the cache's max_len."""
    num_real = num_real.astype(jnp.int32)
    layers = _flush_pending(config, cache)
    cache = cache._replace(layers=layers, pending_real=jnp.zeros_like(cache.pending_real))
    query_pos = cache.lengths[:, None] + jnp.arange(tokens.shape[1])[None]     # text positions (B, C)
    prefix = [LayerState(None if s.kv is None else KV(*(jnp.swapaxes(t, 1, 2) for t in s.kv)), s.ssm)
              for s in layers]                                                  # (B, slots, kv_heads, d)
    hidden, states = HymbaForCausalLM(config).apply(
        {"params": params}, tokens, config.num_meta_tokens + query_pos, _masks(config, cache, query_pos),
        prefix, num_real, method=_chunk_forward)
    layers = tuple(LayerState(old.kv, new.ssm) for old, new in zip(layers, states))
    pending = tuple(new.kv if old.kv is not None else None for old, new in zip(layers, states))
    return hidden, Cache(layers, cache.lengths + num_real, pending, num_real)


def _donating(fn: Callable, **jit_kwargs) -> Callable:
    """jax.jit with donated arguments. The cache is updated in place; only the pending K/V cannot be when
    the chunk length changes, which JAX reports as a warning on every new shape: not worth one."""
    jitted = jax.jit(fn, **jit_kwargs)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return jitted(*args, **kwargs)
    call.lower = jitted.lower
    return call


extend = _donating(_extend, static_argnums=0, donate_argnums=2)


def _flush(config: HymbaConfig, cache: Cache) -> Cache:
    """Write the pending K/V into the buffers; the pending slot becomes one empty position per row (the
    shape `decode_loop` carries, whatever chunk came last)."""
    return Cache(_flush_pending(config, cache), cache.lengths, empty_pending(config, cache.batch),
                 jnp.zeros_like(cache.pending_real))


flush = _donating(_flush, static_argnums=0, donate_argnums=1)


def _logits(config: HymbaConfig, params, hidden: jax.Array) -> jax.Array:
    return HymbaForCausalLM(config).apply({"params": params}, hidden, method=HymbaForCausalLM.logits)


logits_of = jax.jit(_logits, static_argnums=0)
logits_of.__doc__ = "Final-normed hidden states (..., d) -> fp32 logits (..., vocab)."


def _prefill_chunk(config, params, cache, tokens, num_real, last):
    hidden, cache = _extend(config, params, cache, tokens, num_real)
    at_end = hidden[jnp.arange(hidden.shape[0]), jnp.maximum(num_real - 1, 0)]
    return cache, jnp.where((num_real > 0)[:, None], at_end, last)


_prefill_chunk = _donating(_prefill_chunk, static_argnums=0, donate_argnums=(2, 5))


def prefill(config: HymbaConfig, params, cache: Cache, tokens: np.ndarray, lengths: np.ndarray, chunk: int
            ) -> tuple[jax.Array, Cache]:
    """Run right-padded prompts (B, T) of `lengths` (B,) through the cache, `chunk` positions per call
    (one compiled function for every chunk). Returns the logits (B, vocab) after each prompt's last token
    and the cache, flushed."""
    tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
    if lengths.min() < 1:
        raise ValueError("every prompt needs at least one token (start it with the BOS id)")
    if lengths.max() > tokens.shape[1]:
        raise ValueError(f"prompt lengths up to {lengths.max()} given for a token array of {tokens.shape[1]} columns")
    check_prompts(config, [row[:n] for row, n in zip(tokens, lengths)])
    num_chunks = math.ceil(int(lengths.max()) / chunk)
    tokens = tokens[:, :num_chunks * chunk]    # columns past every prompt are padding: a wider array is fine
    tokens = np.pad(tokens, ((0, 0), (0, num_chunks * chunk - tokens.shape[1])),
                    constant_values=config.pad_token_id)
    last = jnp.zeros((tokens.shape[0], config.hidden_size), jnp.dtype(config.dtype))
    for k in range(num_chunks):
        num_real = np.clip(lengths - k * chunk, 0, chunk)
        cache, last = _prefill_chunk(config, params, cache, tokens[:, k * chunk:(k + 1) * chunk], num_real, last)
    return logits_of(config, params, last), flush(config, cache)


@functools.partial(jax.jit, static_argnames=("config", "max_out", "on_token"), donate_argnames=("cache",))
def decode_loop(config: HymbaConfig, params, cache: Cache, logits: jax.Array, keys: jax.Array,
                stop_ids: jax.Array, sampling: tuple[jax.Array, ...], max_new_tokens: jax.Array, *,
                max_out: int, on_token: Optional[TokenCallback] = None) -> tuple[jax.Array, jax.Array, Cache]:
    """Sample up to `max_new_tokens` (<= max_out) tokens per row, starting from the logits (B, vocab) after
    the prompt.

    keys (B,): one PRNG key per row (step i draws with fold_in(key, i)); stop_ids (S,) int: a row ends at
    the first of them (not included in its output); sampling: `Sampling(...).arrays()`. Returns tokens
    (B, max_out) (pad_token_id after a row's end), the number of tokens generated per row (B,) and the
    cache (flushed).
    """
    batch = logits.shape[0]

    def cond(carry):
        step, _, _, _, _, done = carry
        return (step < jnp.minimum(max_new_tokens, max_out)) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, out, count, done = carry
        token = sample(logits, jax.vmap(jax.random.fold_in, (0, None))(keys, step), sampling)
        emitted = ~done & ~jnp.isin(token, stop_ids)
        token = jnp.where(emitted, token, config.pad_token_id)
        if on_token is not None:
            io_callback(on_token, None, step, token, emitted, ordered=True)
        hidden, cache = _extend(config, params, cache, token[:, None], emitted.astype(jnp.int32))
        return (step + 1, cache, _logits(config, params, hidden[:, 0]), out.at[:, step].set(token),
                count + emitted, ~emitted)

    out = jnp.full((batch, max_out), config.pad_token_id, jnp.int32)
    zeros = jnp.zeros((batch,), jnp.int32)
    init = (jnp.int32(0), cache, logits, out, zeros, jnp.zeros((batch,), bool))
    _, cache, _, out, count, _ = jax.lax.while_loop(cond, body, init)
    return out, count, _flush(config, cache)


def check_prompts(config: HymbaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 0) -> None:
    """ValueError for token ids outside the vocabulary (the embedding would read a wrong row: -1 the last
    one, >= vocab_size garbage) and for prompts that, with `max_new_tokens`, need more text positions than
    the model has: max_position_embeddings - num_meta_tokens (the meta tokens take the first positions;
    the rotary embedding and the released model were set up for no more; the eval Scorer's limit too)."""
    bad = sorted({int(t) for p in prompts for t in p if not 0 <= t < config.vocab_size})
    if bad:
        raise ValueError(f"token ids {bad[:10]} are outside the vocabulary 0..{config.vocab_size - 1}")
    longest, limit = max(len(p) for p in prompts), config.max_position_embeddings - config.num_meta_tokens
    if longest + max_new_tokens > limit:
        raise ValueError(f"the longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) passes the "
                         f"model's {limit} text positions (max_position_embeddings {config.max_position_embeddings} "
                         f"- {config.num_meta_tokens} meta tokens); shorten the prompt or generate fewer tokens")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_ids(ids: Sequence[int], multiple: int = 8) -> jax.Array:
    """Stop ids padded with -1 (never a token) to a multiple of 8, so their number rarely recompiles."""
    ids = list(ids)
    return jnp.asarray(ids + [-1] * (_round_up(max(len(ids), 1), multiple) - len(ids)), jnp.int32)


class Generator:
    """Generation for one model and set of weights: the meta tokens' state is computed once, here.

        gen = Generator(config, params)
        outputs = gen.generate([[1, 5, 7], [1, 9]], max_new_tokens=32, sampling=Sampling(temperature=0.8))

    Compiled functions are reused across calls with the same batch size, prompt chunk and cache size
    (`max_len`, by default the prompts plus `max_new_tokens` rounded up to `len_multiple`).
    """

    def __init__(self, config: HymbaConfig, params, *, prefill_chunk: int = 512, len_multiple: int = 256):
        self.config, self.params = config, params
        self.prefill_chunk, self.len_multiple = prefill_chunk, len_multiple
        self.meta: MetaState = meta_state(config, params)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), seed: int | Sequence[int] = 0, max_len: Optional[int] = None,
                 on_token: Optional[TokenCallback] = None) -> list[list[int]]:
        """Continuations of token prompts (each its own length, at least one token), stop token excluded.

        seed: an int (row b uses seed + b) or one seed per row; a row's tokens depend only on its prompt
        and seed, never on the rest of the batch.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("pass at least one prompt, each of at least one token (e.g. the BOS id)")
        lengths = np.array([len(p) for p in prompts], np.int32)
        need = int(lengths.max()) + max_new_tokens
        max_len = max_len or _round_up(need, self.len_multiple)
        if need > max_len:
            raise ValueError(f"the longest prompt ({lengths.max()} tokens) plus max_new_tokens ({max_new_tokens}) "
                             f"needs max_len >= {need}, got {max_len}")
        check_prompts(self.config, prompts, max_new_tokens)
        seeds = (np.arange(len(prompts)) + seed) if isinstance(seed, int) else np.asarray(seed)
        if seeds.shape != (len(prompts),):
            raise ValueError(f"pass one seed per prompt ({len(prompts)}), got {len(seeds)}")

        chunk = min(self.prefill_chunk, 1 << (int(lengths.max()) - 1).bit_length())
        tokens = np.full((len(prompts), _round_up(int(lengths.max()), chunk)), self.config.pad_token_id, np.int32)
        for b, p in enumerate(prompts):
            tokens[b, :len(p)] = p
        cache = init_cache(self.config, self.meta, len(prompts), max_len)
        logits, cache = prefill(self.config, self.params, cache, tokens, lengths, chunk)
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
        out, count, _ = decode_loop(self.config, self.params, cache, logits, keys,
                                    _padded_ids(stop_ids), sampling.arrays(),
                                    jnp.int32(max_new_tokens), max_out=max_len, on_token=on_token)
        out, count = np.asarray(out), np.asarray(count)
        return [out[b, :count[b]].tolist() for b in range(len(prompts))]
