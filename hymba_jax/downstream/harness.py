"""lm-evaluation-harness model `hymba_jax`: the harness's requests on our JAX scorer.

Optional: needs `pip install hymba-jax[eval]` (lm-eval >= 0.4). The harness has no plugin discovery for
models, so run its CLI through this module, which registers the model first:

    python -m hymba_jax.downstream.harness --model hymba_jax \\
        --model_args checkpoint=/path/to/hf_checkpoint,tokenizer=/path/to/tokenizer.model \\
        --tasks arc_easy,piqa

(the arguments are lm_eval's). From Python: `import hymba_jax.downstream.harness` and then
`lm_eval.simple_evaluate(model="hymba_jax", model_args=...)`. Model arguments: checkpoint (HF directory,
training workdir or preset:NAME), tokenizer ('' = the checkpoint's own, 'ascii', or a path), dtype (compute;
the weights stay fp32), max_length, tokens_per_batch, add_bos. Both load through hymba_jax.loading.
"""

from __future__ import annotations

from typing import Optional

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from hymba_jax.downstream.evaluator import generate_texts
from hymba_jax.downstream.scorer import Scorer
from hymba_jax.downstream.tasks import Request
from hymba_jax.loading import load_model, load_tokenizer


@register_model("hymba_jax")
class HymbaJaxLM(TemplateLM):
    """loglikelihood (via TemplateLM's tokenization), loglikelihood_rolling and generate_until, greedy."""

    def __init__(self, checkpoint: str, tokenizer: str = "", dtype: str = "float32",
                 max_length: Optional[int] = None, tokens_per_batch: int = 8192, add_bos: bool = True,
                 **harness_kwargs):
        super().__init__()
        # batch_size / device from the harness CLI do not apply: batches are bucketed by tokens.
        del harness_kwargs
        config, params = load_model(checkpoint, dtype=dtype)
        self.tok = load_tokenizer(checkpoint, tokenizer)
        self.add_bos = bool(add_bos)
        self.scorer = Scorer(config, params, max_length=max_length, tokens_per_batch=int(tokens_per_batch))

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else add_special_tokens and self.add_bos
        return ([self.tok.bos_id] if bos else []) + self.tok.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return [tuple(r) for r in self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok.encode(r.args[0]) for r in requests]
        return self.scorer.rolling_loglikelihood(docs, self.prefix_token_id)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        reqs = []
        for r in requests:
            context, gen_kwargs = r.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if gen_kwargs.get("do_sample") and gen_kwargs.get("temperature", 0.0) > 0:
                raise ValueError("hymba_jax generates greedily; this task asks for sampling (do_sample with "
                                 "temperature > 0)")
            max_gen_toks = min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length - 1)
            reqs.append(Request(context, until=tuple(until), max_gen_toks=max_gen_toks))
        return generate_texts(self.scorer, self.tok, reqs, self.add_bos)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
