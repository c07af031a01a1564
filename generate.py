"""Generate text (or token ids) from a training workdir or a Hugging Face checkpoint directory.

    python generate.py --workdir /tmp/hymba-tiny --prompt "The capital of France is" --config.max_new_tokens=32
    python generate.py --config.hf_checkpoint=DIR --prompt_ids 1,5,7 --prompt_ids 1,9 --config.temperature=0.8

    python generate.py --workdir /tmp/hymba-tiny-sft --config.chat=True --prompt "What is 12 + 30?"

The settings are `--config.<key>=value` (generate_config below); `--workdir DIR` is train.py's flag and the
same as `--config.workdir=DIR` (hymba_jax/cli.py). With chat=True each prompt is a user message, rendered
with the checkpoint's chat template (its tokenizer_config.json's, a fine-tuning workdir's, or
config.chat_template) and the assistant's header, token for token as in fine-tuning
(hymba_jax/data/chat.py); the reply ends at the end-of-turn eos.

A single prompt streams its tokens as they are generated; several prompts run as one ragged batch and are
printed at the end. Text prompts need a SentencePiece model (config.tokenizer, default the checkpoint's own:
DIR/tokenizer.model, or a workdir's training tokenizer); `--prompt_ids` needs none and prints ids. See
docs/inference.md.
"""

from __future__ import annotations

import sys
import time
from typing import Sequence

import ml_collections

from hymba_jax import cli, compilation_cache
from hymba_jax.data import chat
from hymba_jax.infer.engine import Generator
from hymba_jax.infer.sampling import Sampling
from hymba_jax.loading import load_chat_template, load_model, load_tokenizer


def generate_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = ""            # a training workdir (train.py --workdir); --workdir sets it too
    c.hf_checkpoint = ""      # or a Hugging Face checkpoint directory
    c.tokenizer = ""          # text prompts: a SentencePiece .model ('' = the checkpoint's own)
    c.add_bos = True          # text prompts start with the BOS id (chat: the template decides)
    c.chat = False            # prompts are user messages, rendered by the chat template
    c.system = ""             # chat: a system message before each prompt
    c.chat_template = ""      # chat: 'default', a .jinja file or a tokenizer_config.json ('' = the checkpoint's)
    c.max_new_tokens = 64
    c.temperature = 0.0       # 0: greedy
    c.top_k = 0               # 0: off
    c.top_p = 1.0             # 1: off
    c.seed = 0                # row b samples with seed + b
    c.stop_ids = "eos"        # comma-separated ids that end a row; 'eos': the config's eos id; '': none
    c.dtype = "float32"       # parameters and compute: float32 or bfloat16
    c.max_len = 0             # cache length; 0: prompt + new tokens, rounded up
    c.prefill_chunk = 512     # prompt positions per prefill call
    c.compilation_cache_dir = compilation_cache.DEFAULT_DIR   # compiled programs kept across runs; '' = off
    return c


def parse_ids(text: str, what: str) -> list[int]:
    """'1,5,7' -> [1, 5, 7] ('' -> []); a SystemExit naming `what` otherwise."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise SystemExit(f"config error: {what}={text!r}: expected comma-separated token ids like 1,5,7") from None


class _Streamer:
    """Prints row 0's tokens as they arrive: ids, or the text they add (decoding the whole continuation
    each time, so pieces that only make sense together, such as byte-fallback UTF-8, print correctly)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, step, tokens, emitted) -> None:
        if not emitted[0]:
            return
        self.ids.append(int(tokens[0]))
        if self.tokenizer is None:
            print(("" if len(self.ids) == 1 else " ") + str(self.ids[-1]), end="", flush=True)
            return
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):                 # wait for the rest of a multi-byte character
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text


def generate(config: ml_collections.ConfigDict, prompts: Sequence[str] = (),
             prompt_ids: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """Generates for text `prompts` or token `prompt_ids` (one of them) with the settings of `config`
    (generate_config); prints the output (one prompt: streamed) and returns the generated ids per prompt."""
    if bool(prompts) == bool(prompt_ids):
        raise SystemExit("config error: give text prompts (--prompt) or token ids (--prompt_ids), not both and "
                         "not neither")
    if config.chat and (prompt_ids or not config.add_bos):
        raise SystemExit("config error: chat=True renders text prompts with the chat template (which decides the "
                         "BOS): drop --prompt_ids and add_bos=False")
    if (config.system or config.chat_template) and not config.chat:
        raise SystemExit("config error: system and chat_template need chat=True")
    if config.dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"config error: dtype={config.dtype!r}: expected float32 or bfloat16")
    stop_ids = None if config.stop_ids == "eos" else parse_ids(config.stop_ids, "stop_ids")
    source = cli.model_source(config)
    compilation_cache.enable(config.compilation_cache_dir)

    model_config, params = load_model(source, config.dtype, param_dtype=config.dtype)
    tokenizer = None
    if prompts:
        try:
            tokenizer = load_tokenizer(source, config.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"text prompts need a tokenizer: {e}; or give token ids with --prompt_ids") from None
    if config.chat:
        template = load_chat_template(source, tokenizer, config.chat_template)
        system = [{"role": "system", "content": config.system}] if config.system else []
        prompt_ids = [chat.prompt_ids(tokenizer, template, system + [{"role": "user", "content": text}])
                      for text in prompts]
    elif tokenizer is not None:
        bos = [tokenizer.bos_id] if config.add_bos else []
        prompt_ids = [bos + tokenizer.encode(text) for text in prompts]
    stop_ids = [model_config.eos_token_id] if stop_ids is None else stop_ids
    sampling = Sampling(config.temperature, config.top_k, config.top_p)
    generator = Generator(model_config, params, prefill_chunk=config.prefill_chunk)

    streamer = _Streamer(tokenizer) if len(prompt_ids) == 1 else None
    start = time.perf_counter()
    outputs = generator.generate([list(p) for p in prompt_ids], config.max_new_tokens, sampling=sampling,
                                 stop_ids=stop_ids, seed=config.seed, max_len=config.max_len or None,
                                 on_token=streamer)
    seconds = time.perf_counter() - start
    if streamer is not None:
        print()
    else:
        for b, out in enumerate(outputs):
            shown = tokenizer.decode(out) if tokenizer is not None else " ".join(map(str, out))
            print(f"[{b}] {shown}")
    total = sum(map(len, outputs))
    print(f"{total} tokens for {len(prompt_ids)} prompt(s) in {seconds:.2f} s (compilation included)",
          file=sys.stderr)
    return outputs


if __name__ == "__main__":
    from absl import flags

    _CONFIG = cli.define_config(generate_config(), "generation settings", where="generate.py:generate_config")
    _WORKDIR = cli.define_workdir("training workdir to generate from, as in train.py (the same as "
                                  "--config.workdir)")
    _PROMPT = flags.DEFINE_multi_string("prompt", [], "text prompt (repeat for a batch)")
    _PROMPT_IDS = flags.DEFINE_multi_string("prompt_ids", [], "comma-separated token ids, e.g. 1,5,7 (repeat for "
                                            "a batch); no tokenizer needed")
    cli.run(lambda: generate(cli.settings(_CONFIG, _WORKDIR), _PROMPT.value,
                             [parse_ids(text, "--prompt_ids") for text in _PROMPT_IDS.value]))
