"""Generate text (or token ids) from a Hugging Face checkpoint directory or a training workdir.

    python -m hymba_jax.infer.generate --checkpoint DIR --prompt "The capital of France is" --max_new_tokens 32
    python -m hymba_jax.infer.generate --checkpoint DIR --prompt_ids 1,5,7 --prompt_ids 1,9 --temperature 0.8

    python -m hymba_jax.infer.generate --checkpoint DIR --chat --prompt "What is 12 + 30?"

With --chat each prompt is a user message, rendered with the checkpoint's chat template (its
tokenizer_config.json's, a fine-tuning workdir's, or --chat_template) and the assistant's header, token for
token as in fine-tuning (hymba_jax/data/chat.py); the reply ends at the end-of-turn eos.

A single prompt streams its tokens as they are generated; several prompts run as one ragged batch and are
printed at the end. Text prompts need a SentencePiece model (`--tokenizer`, default the checkpoint's own:
DIR/tokenizer.model, or a workdir's training tokenizer); `--prompt_ids` needs none and prints ids. See
docs/inference.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

from hymba_jax import compilation_cache
from hymba_jax.data import chat
from hymba_jax.infer.engine import Generator
from hymba_jax.infer.sampling import Sampling
from hymba_jax.loading import load_chat_template, load_model, load_tokenizer


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids like 1,5,7, got {text!r}") from None


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


def main(argv: Optional[Sequence[str]] = None) -> list[list[int]]:
    p = argparse.ArgumentParser(prog="python -m hymba_jax.infer.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint dir or training workdir")
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for a batch)")
    p.add_argument("--prompt_ids", action="append", default=[], type=_parse_ids,
                   help="comma-separated token ids, e.g. 1,5,7 (repeat for a batch); no tokenizer needed")
    p.add_argument("--tokenizer", default="", help="SentencePiece .model (default: the checkpoint's own)")
    p.add_argument("--no_bos", action="store_true", help="do not start text prompts with the BOS id")
    p.add_argument("--chat", action="store_true", help="prompts are user messages, rendered by the chat template")
    p.add_argument("--system", default="", help="--chat: a system message before each prompt")
    p.add_argument("--chat_template", default="",
                   help="--chat: 'default', a .jinja file or a tokenizer_config.json (default: the checkpoint's)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top_k", type=int, default=0, help="0: off")
    p.add_argument("--top_p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0, help="row b samples with seed + b")
    p.add_argument("--stop_ids", type=_parse_ids, default=None,
                   help="comma-separated ids that end a row (default: the config's eos id; '' for none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameters and compute")
    p.add_argument("--max_len", type=int, default=None, help="cache length (default: prompt + new, rounded up)")
    p.add_argument("--prefill_chunk", type=int, default=512, help="prompt positions per prefill call")
    p.add_argument("--compilation_cache_dir", default=compilation_cache.DEFAULT_DIR,
                   help="compiled programs kept across runs ('' = off)")
    args = p.parse_args(argv)
    if bool(args.prompt) == bool(args.prompt_ids):
        p.error("give text prompts (--prompt) or token ids (--prompt_ids), not both and not neither")
    if args.chat and (args.prompt_ids or args.no_bos):
        p.error("--chat renders text prompts with the chat template (which decides the BOS): drop --prompt_ids "
                "and --no_bos")
    if (args.system or args.chat_template) and not args.chat:
        p.error("--system and --chat_template need --chat")
    compilation_cache.enable(args.compilation_cache_dir)

    config, params = load_model(args.checkpoint, args.dtype, param_dtype=args.dtype)
    tokenizer = None
    if args.prompt:
        try:
            tokenizer = load_tokenizer(args.checkpoint, args.tokenizer)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"text prompts need a tokenizer: {e}; or give token ids with --prompt_ids") from None
    if args.chat:
        template = load_chat_template(args.checkpoint, tokenizer, args.chat_template)
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [chat.prompt_ids(tokenizer, template, system + [{"role": "user", "content": text}])
                   for text in args.prompt]
    elif tokenizer is not None:
        bos = [] if args.no_bos else [tokenizer.bos_id]
        prompts = [bos + tokenizer.encode(text) for text in args.prompt]
    else:
        prompts = args.prompt_ids
    stop_ids = [config.eos_token_id] if args.stop_ids is None else args.stop_ids
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    generator = Generator(config, params, prefill_chunk=args.prefill_chunk)

    streamer = _Streamer(tokenizer) if len(prompts) == 1 else None
    start = time.perf_counter()
    outputs = generator.generate(prompts, args.max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                                 seed=args.seed, max_len=args.max_len, on_token=streamer)
    seconds = time.perf_counter() - start
    if streamer is not None:
        print()
    else:
        for b, out in enumerate(outputs):
            shown = tokenizer.decode(out) if tokenizer is not None else " ".join(map(str, out))
            print(f"[{b}] {shown}")
    total = sum(map(len, outputs))
    print(f"{total} tokens for {len(prompts)} prompt(s) in {seconds:.2f} s (compilation included)", file=sys.stderr)
    return outputs


if __name__ == "__main__":
    main()
