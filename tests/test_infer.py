"""Inference: cached prefill + decoding against the full forward, ragged batches against one-by-one
generation, the CLI on the released-layout fixture, sampling filters and cache-size accounting."""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hymba_jax.config import hymba_1p5b, hymba_tiny, llama_3p2_3b_shape, llama_style
from hymba_jax.infer import (Generator, Sampling, cache_bytes, cache_size, extend, filter_logits, init_cache,
                             logits_of, meta_state, sample, tree_bytes)
from hymba_jax.infer.engine import decode_loop, flush
from hymba_jax.model import HymbaForCausalLM, param_shapes

from train_testing import REPO

sys.path.insert(0, str(REPO))
from generate import generate, generate_config  # noqa: E402   generate.py, the command line

# Window 5 (text runs to 40 positions), a global layer, a KV-sharing group of three, d_conv 3, 4 meta tokens.
CONFIG = hymba_tiny(num_layers=4, sliding_window=5, global_layers=(0,), kv_reuse_groups=((1, 2, 3),), d_conv=3)
SHAPE = (3, 40)   # every full forward of CONFIG here has this shape (one compilation)


def random_params(config, seed):
    """Every parameter random (norm scales around 1), made on the host: no model compilation needed."""
    rng = np.random.default_rng(seed)
    leaves, tree = jax.tree_util.tree_flatten_with_path(param_shapes(config))
    draw = lambda path, s: rng.normal(1.0 if "scale" in jax.tree_util.keystr(path) else 0.0, 0.3, s.shape)
    return jax.tree_util.tree_unflatten(tree, [jnp.asarray(draw(p, s), s.dtype) for p, s in leaves])


@pytest.fixture(scope="module")
def params():
    return random_params(CONFIG, 0)


@pytest.fixture(scope="module")
def generator(params):
    return Generator(CONFIG, params, prefill_chunk=8, len_multiple=64)


@jax.jit
def _forward(params, ids):
    return HymbaForCausalLM(CONFIG).apply({"params": params}, ids)


def full_logits(config, params, ids):
    """Full-forward logits of ids (B, T); CONFIG's inputs are right-padded to SHAPE (causal: the padding
    changes nothing before it)."""
    if config != CONFIG:
        return np.asarray(HymbaForCausalLM(config).apply({"params": params}, ids))
    padded = np.zeros(SHAPE, np.int32)
    padded[:ids.shape[0], :ids.shape[1]] = ids
    return np.asarray(_forward(params, padded))[:ids.shape[0], :ids.shape[1]]


def cached_logits(config, params, ids, prompt_lengths, chunk, max_len):
    """Logits of every position of ids (B, T) computed through the cache: each row's prompt in ragged
    chunks, then one token per step (rows that are done take 0 tokens). Returns (logits, final cache)."""
    batch, total = ids.shape
    cache = init_cache(config, meta_state(config, params), batch, max_len)
    out = np.full((batch, total, config.vocab_size), np.nan, np.float32)
    done = np.zeros(batch, int)
    for start in range(0, max(prompt_lengths), chunk):                     # prefill
        num = np.clip(np.asarray(prompt_lengths) - start, 0, chunk)
        tokens = np.zeros((batch, chunk), np.int32)
        for b in range(batch):
            tokens[b, :num[b]] = ids[b, start:start + num[b]]
        hidden, cache = extend(config, params, cache, tokens, num)
        logits = np.asarray(logits_of(config, params, hidden))
        for b in range(batch):
            out[b, start:start + num[b]] = logits[b, :num[b]]
        done += num
    cache = flush(config, cache)
    while (done < total).any():                                             # decode
        num = (done < total).astype(np.int32)
        tokens = ids[np.arange(batch), np.minimum(done, total - 1)][:, None]
        hidden, cache = extend(config, params, cache, tokens, num)
        logits = np.asarray(logits_of(config, params, hidden[:, 0]))
        out[num == 1, done[num == 1]] = logits[num == 1]
        done += num
    return out, cache


def test_prefill_and_decode_match_full_forward(params):
    """Three rows with prompts of 11, 6 and 17 tokens, prefilled in ragged chunks of 8 (longer than the
    window: the ring is overwritten inside a chunk), then decoded token by token to 40 positions (rows that
    are done take 0 tokens while the others go on). Every position's logits equal the full forward's."""
    ids = np.asarray(jax.random.randint(jax.random.key(1), SHAPE, 0, CONFIG.vocab_size), np.int32)
    got, cache = cached_logits(CONFIG, params, ids, [11, 6, 17], chunk=8, max_len=SHAPE[1])
    want = full_logits(CONFIG, params, ids)
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    print(f"max |cached - full| logits: {err:.2e} of logits up to {scale:.1f}")
    # fp32 rounding, summed in another order (chunks, one-token steps, the cache's fp32 state) and
    # amplified by 4 layers of random weights: 1.1e-5 of the largest logit on the CPU (a wrong slot or
    # mask is off by a good fraction of a logit).
    assert err < 3e-5 * scale
    assert np.asarray(cache.lengths).tolist() == [SHAPE[1]] * 3
    # The cache holds exactly the bytes cache_bytes promises.
    assert tree_bytes(cache) == cache_bytes(CONFIG, SHAPE[1], batch=3)


@pytest.mark.slow
@pytest.mark.parametrize("name, config", [
    ("no meta tokens, window 3", CONFIG.replace(num_meta_tokens=0, sliding_window=3)),
    ("attention only", CONFIG.replace(layer_kind="attention")),
    ("ssm only, d_conv 2", CONFIG.replace(layer_kind="ssm", d_conv=2)),
    ("llama-style", llama_style(64, 2, 4, 2, 96, vocab_size=101)),
])
def test_cached_logits_variants(name, config):
    params = random_params(config, 2)
    ids = np.asarray(jax.random.randint(jax.random.key(3), (2, 20), 0, config.vocab_size), np.int32)
    got, _ = cached_logits(config, params, ids, [7, 3], chunk=4, max_len=20)
    np.testing.assert_allclose(got, full_logits(config, params, ids), atol=1e-4)


PROMPTS = [[1, 5, 7, 8, 9, 10, 11, 12, 13], list(range(1, 15)), [1, 9, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("sampling, stop_ids", [(Sampling(), ()), (Sampling(1.0, top_k=20, top_p=0.9), (7, 2))])
def test_ragged_batch_equals_one_by_one(generator, sampling, stop_ids):
    streamed = []
    batched = generator.generate(PROMPTS, 24, sampling=sampling, seed=3, stop_ids=stop_ids,
                                 on_token=lambda step, tokens, emitted: streamed.append((step, tokens, emitted)))
    alone = [generator.generate([p], 24, sampling=sampling, seed=3 + b, stop_ids=stop_ids)[0]
             for b, p in enumerate(PROMPTS)]
    print("batched:", batched)
    assert batched == alone
    assert all(len(out) > 0 for out in batched) and not any(t in stop_ids for out in batched for t in out)
    # The stream delivered every token in order.
    assert [int(s) for s, _, _ in streamed] == list(range(len(streamed)))
    for b, out in enumerate(batched):
        assert [int(t[b]) for _, t, e in streamed if e[b]] == out
    if stop_ids:
        assert min(map(len, batched)) < 24, "no row stopped: pick other stop ids"
    else:   # greedy: each token is the argmax of the full forward over the prompt and the tokens before it
        ids = np.zeros(SHAPE, np.int32)
        for b, (p, out) in enumerate(zip(PROMPTS, batched)):
            ids[b, :len(p) + len(out)] = p + out
        logits = full_logits(CONFIG, generator.params, ids)
        for b, (p, out) in enumerate(zip(PROMPTS, batched)):
            assert out == np.argmax(logits[b, len(p) - 1:len(p) + len(out) - 1], axis=-1).tolist()


def test_generate_refuses_bad_requests(generator):
    with pytest.raises(ValueError, match="max_len"):
        generator.generate([[1, 2, 3]], 10, max_len=8)
    with pytest.raises(ValueError, match="at least one token"):
        generator.generate([[1], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generator.generate([[1, 101]], 4)
    with pytest.raises(ValueError, match=r"token ids \[-1\] are outside the vocabulary"):
        generator.generate([[1, -1]], 4)               # would read the last embedding row
    with pytest.raises(ValueError, match=r"passes the model's 60 text positions \(max_position_embeddings 64 - 4"):
        generator.generate([[1] * 50], 11)
    generator.generate([[1] * 50], 10)                 # 60: the last position there is


def test_prefill_checks_its_inputs_and_takes_a_wider_token_array(params):
    """A token array wider than the chunks needs (padding columns) gives the same logits as the narrow
    one; lengths past the array and ids outside the vocabulary are refused before any compute."""
    from hymba_jax.infer.engine import prefill

    lengths = np.array([3, 5])
    narrow = np.zeros((2, 8), np.int32)
    narrow[0, :3], narrow[1, :5] = [1, 2, 3], [4, 5, 6, 7, 8]
    wide = np.concatenate([narrow, np.full((2, 13), 9, np.int32)], axis=1)
    meta = meta_state(CONFIG, params)
    got = [np.asarray(prefill(CONFIG, params, init_cache(CONFIG, meta, 2, 64), t, lengths, 8)[0])
           for t in (narrow, wide)]
    np.testing.assert_array_equal(got[0], got[1])
    with pytest.raises(ValueError, match="prompt lengths up to 9 given for a token array of 8 columns"):
        prefill(CONFIG, params, init_cache(CONFIG, meta, 2, 64), narrow, np.array([3, 9]), 8)
    bad = narrow.copy()
    bad[1, 4] = CONFIG.vocab_size
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prefill(CONFIG, params, init_cache(CONFIG, meta, 2, 64), bad, lengths, 8)


def settings(**values):
    config = generate_config()
    config.update(values)
    return config


def test_cli_generates_from_the_fixture(tiny_a_dir, tiny_a_expected):
    """Greedy generation through `python generate.py` (flags parsed as users give them) from the
    released-layout fixture: the first token is the released model's argmax after the prompt, the rest are
    what the library generates, and all are printed."""
    from hymba_jax.loading import load_model

    prompt = tiny_a_expected["input_ids"][0, :12].tolist()
    proc = subprocess.run([sys.executable, str(REPO / "generate.py"), f"--config.hf_checkpoint={tiny_a_dir}",
                           "--prompt_ids", ",".join(map(str, prompt)), "--config.max_new_tokens=8",
                           "--config.stop_ids=", "--config.compilation_cache_dir="],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [int(t) for t in proc.stdout.split()]
    assert len(printed) == 8 and printed[0] == int(np.argmax(tiny_a_expected["logits"][0, 11]))
    config, params = load_model(str(tiny_a_dir), "float32")
    assert [printed] == Generator(config, params).generate([prompt], 8)


def test_cli_refusals(tiny_a_dir):
    with pytest.raises(SystemExit, match="tokenizer"):
        generate(settings(hf_checkpoint=str(tiny_a_dir)), prompts=["hello"])
    with pytest.raises(SystemExit, match="exactly one of --workdir"):
        generate(settings(), prompt_ids=[[1, 2]])
    with pytest.raises(SystemExit, match="not both"):
        generate(settings(hf_checkpoint=str(tiny_a_dir)), prompts=["hello"], prompt_ids=[[1, 2]])
    with pytest.raises(SystemExit, match="stop_ids='1,x'"):
        generate(settings(hf_checkpoint=str(tiny_a_dir), stop_ids="1,x"), prompt_ids=[[1, 2]])


def test_cli_takes_text_on_an_export_that_carries_its_tokenizer(tmp_path, tiny_a, capsys):
    """An export with a tokenizer is a checkpoint the CLI generates text from, with no --tokenizer (a BPE
    model of exactly the fixture's 101 ids, so whatever the random weights generate decodes)."""
    import sentencepiece as spm

    from hymba_jax.hf import save_hf_checkpoint

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"line {i} of some text to learn from, the quick brown fox jumps over the lazy dog"
                                for i in range(300)]),
        model_prefix=str(tmp_path / "sp"), vocab_size=101, model_type="bpe", unk_id=0, bos_id=1, eos_id=2,
        pad_id=3, minloglevel=2)
    config, params = tiny_a
    save_hf_checkpoint(tmp_path / "export", config, params, dtype=jnp.float32, tokenizer=tmp_path / "sp.model")
    outputs = generate(settings(hf_checkpoint=str(tmp_path / "export"), max_new_tokens=4, stop_ids=""),
                       prompts=["some text"])
    assert len(outputs[0]) == 4 and capsys.readouterr().out.strip()


def test_sampling_filters():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda s: np.isfinite(np.asarray(filter_logits(logits, *s.arrays())))[0].tolist()
    assert kept(Sampling(1.0)) == [True] * 4
    assert kept(Sampling(1.0, top_k=2)) == [True, True, False, False]
    assert kept(Sampling(1.0, top_p=0.79)) == [True, True, False, False]    # 0.5 + 0.3 reaches 0.79
    assert kept(Sampling(1.0, top_p=0.81)) == [True, True, True, False]
    assert kept(Sampling(1.0, top_k=3, top_p=0.5)) == [True, False, False, False]
    assert kept(Sampling(1.0, top_k=3, top_p=0.9)) == [True, True, True, False]  # top-p after top-k: 0.95 mass
    np.testing.assert_allclose(filter_logits(logits, *Sampling(2.0).arrays()), logits / 2)
    keys = jax.vmap(jax.random.key)(jnp.arange(2000, dtype=jnp.uint32))
    draws = np.asarray(sample(jnp.repeat(logits, 2000, axis=0), keys, Sampling(1.0, top_p=0.79)))
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 2000, [0.625, 0.375, 0, 0], atol=0.04)
    assert np.asarray(sample(logits, keys[:1], Sampling())).tolist() == [0]
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=float("nan")),
                dict(temperature=float("inf")), dict(top_p=float("nan"))):
        with pytest.raises(ValueError, match="Sampling"):
            Sampling(**bad)


@functools.lru_cache
def meta_shapes(config):
    return jax.eval_shape(lambda p: meta_state(config, p), param_shapes(config))


@pytest.mark.parametrize("config", [hymba_1p5b(dtype="bfloat16"), llama_3p2_3b_shape(dtype="bfloat16"), CONFIG,
                                    CONFIG.replace(layer_kind="ssm"), CONFIG.replace(num_meta_tokens=0)],
                         ids=["hymba_1p5b", "llama_3p2_3b", "tiny", "tiny_ssm", "tiny_no_meta"])
@pytest.mark.parametrize("length, batch", [(1, 1), (1000, 3), (8192, 2)])
def test_cache_bytes_equal_allocated_shapes(config, length, batch):
    shapes = jax.eval_shape(lambda m: init_cache(config, m, batch, length), meta_shapes(config))
    assert cache_bytes(config, length, batch) == tree_bytes(shapes)


def test_cache_sizes_of_the_paper_models():
    """Llama-3.2-3B's K/V at 8k in 16 bits is the paper's 918 MB (bytes / 1.024e6); Hymba-1.5B's is 3
    global layers of 128 + 8192 positions and 14 windowed of 128 + 1024, kv 5 x (64 + 128) values each."""
    llama = cache_size(llama_3p2_3b_shape(dtype="bfloat16"), 8192)
    assert llama.kv == 28 * (8192 + 1) * 8 * (128 + 128) * 2 and llama.conv == llama.ssm == llama.meta_kv == 0
    assert round(28 * 8192 * 8 * 256 * 2 / 1.024e6) == 918
    hymba = cache_size(hymba_1p5b(dtype="bfloat16"), 8192)
    per_position = 5 * (64 + 128) * 2
    assert hymba.kv == (3 * 8193 + 14 * 1025) * per_position
    assert hymba.meta_kv == 17 * 128 * per_position
    assert hymba.ssm == 32 * 3200 * 16 * 4 and hymba.conv == 32 * 3 * 3200 * 2
    assert 10.5 < llama.total / hymba.total < 11.5


def test_decode_loop_updates_the_cache_in_place(params):
    """The compiled generation loop keeps one copy of the cache: its outputs alias the donated cache, and its
    temporaries are smaller than the largest K/V buffer, which a per-step copy (a buffer written after being
    read, or concatenated with the new key) would need at least."""
    batch, max_len = 2, 2048
    cache = jax.eval_shape(lambda m: init_cache(CONFIG, m, batch, max_len), meta_state(CONFIG, params))
    keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.arange(batch, dtype=jnp.uint32)))
    compiled = decode_loop.lower(CONFIG, params, cache, jax.ShapeDtypeStruct((batch, CONFIG.vocab_size), jnp.float32),
                                 keys, jnp.full((8,), -1, jnp.int32), Sampling().arrays(), jnp.int32(4),
                                 max_out=4).compile()
    memory = compiled.memory_analysis()
    largest = max(tree_bytes(state.kv.k) for state in cache.layers if state.kv is not None)
    print(f"cache {tree_bytes(cache)}, aliased {memory.alias_size_in_bytes}, temporaries {memory.temp_size_in_bytes}, "
          f"largest buffer {largest}")
    assert memory.alias_size_in_bytes >= tree_bytes(cache)
    assert memory.temp_size_in_bytes < largest
