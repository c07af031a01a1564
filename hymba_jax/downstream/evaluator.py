"""Running tasks: text requests -> token requests (as the harness tokenizes them) -> scorer -> metrics."""

from __future__ import annotations

import time
from typing import Mapping, Optional, Sequence


from hymba_jax.downstream import metrics
from hymba_jax.downstream.data import load_task_data
from hymba_jax.downstream.greedy import greedy_generate
from hymba_jax.downstream.scorer import LogLikelihood, Scorer
from hymba_jax.downstream.tasks import Request, get_task, fewshot_examples
from hymba_jax.downstream.tokenizer import Tokenizer


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, add_bos: bool = True
                ) -> tuple[list[int], list[int]]:
    """lm-eval's causal `_encode_pair`: trailing spaces of the context move to the continuation, the
    whole string is encoded and split after the context's tokens (so a merge across the boundary is
    kept). An empty context becomes [BOS]. With add_bos, BOS starts every context (as Hugging Face
    Llama-family tokenizers do)."""
    if not context:
        return [tokenizer.bos_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ([tokenizer.bos_id] if add_bos else []) + ctx, whole[len(ctx):]


def loglikelihood_texts(scorer: Scorer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]],
                        add_bos: bool = True, desc: str = "loglikelihood") -> list[LogLikelihood]:
    return scorer.loglikelihood([encode_pair(tokenizer, c, x, add_bos) for c, x in pairs], desc=desc)


def generate_texts(scorer: Scorer, tokenizer: Tokenizer, requests: Sequence[Request], add_bos: bool = True,
                   desc: str = "generate_until") -> list[str]:
    """Greedy continuation of each request's context, cut before the first of its `until` strings."""
    out: list[Optional[str]] = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.until, r.max_gen_toks), []).append(i)
    for (until, max_gen_toks), idx in groups.items():
        prompts = [([tokenizer.bos_id] if add_bos else []) + tokenizer.encode(requests[i].context) for i in idx]
        stop = (lambda ids: any(u in tokenizer.decode(ids) for u in until)) if until else None
        generated = greedy_generate(scorer, prompts, max_gen_toks, stop_ids=(tokenizer.eos_id,), stop=stop,
                                    desc=desc)
        for i, ids in zip(idx, generated):
            text = tokenizer.decode(ids)
            for u in until:
                text = text.split(u)[0]
            out[i] = text
    return out


def evaluate(scorer: Scorer, tokenizer: Tokenizer, tasks: Sequence[str], *, data_dir: Optional[str] = None,
             limit: Optional[int] = None, num_fewshot: Optional[Mapping[str, int]] = None,
             add_bos: bool = True) -> dict:
    """Run tasks and return {"results": {task: {metric: value, metric_stderr, num_docs, num_requests,
    seconds, requests_per_s}}, "config": {...}}."""
    num_fewshot = dict(num_fewshot or {})
    results = {}
    for name in tasks:
        task = get_task(name)
        shots = num_fewshot.get(name, task.num_fewshot)
        data = load_task_data(task, data_dir, limit)
        fewshot = fewshot_examples(task, data.docs, data.fewshot_pool, shots, data.pool_is_eval_split)
        per_doc = [task.requests(doc, fs) for doc, fs in zip(data.docs, fewshot)]
        flat = [r for rs in per_doc for r in rs]
        start = time.perf_counter()
        if task.output_type == "generate_until":
            answers = generate_texts(scorer, tokenizer, flat, add_bos, desc=name)
        else:
            answers = loglikelihood_texts(scorer, tokenizer, [(r.context, r.continuation) for r in flat],
                                          add_bos, desc=name)
        seconds = time.perf_counter() - start
        values: dict[str, list[float]] = {m: [] for m in task.metrics}
        k = 0
        for doc, rs in zip(data.docs, per_doc):
            out = answers[k:k + len(rs)]
            k += len(rs)
            if task.output_type == "multiple_choice":
                doc_metrics = metrics.multiple_choice([o.logprob for o in out], task.choices(doc), task.gold(doc))
            elif task.output_type == "loglikelihood":
                doc_metrics = {"acc": float(out[0].is_greedy), "perplexity": out[0].logprob}
            else:
                doc_metrics = {"contains": metrics.contains(out[0], [task.target(doc)])}
            for m in task.metrics:
                values[m].append(doc_metrics[m])
        row: dict = {}
        for m, v in values.items():
            row[m] = metrics.aggregate(m, v)
            err = metrics.stderr(m, v)
            if err is not None:
                row[f"{m}_stderr"] = err
        row.update(num_docs=len(data.docs), num_fewshot=shots, num_requests=len(flat), seconds=seconds,
                   requests_per_s=len(flat) / seconds if seconds > 0 else float("nan"))
        results[name] = row
    return {"results": results,
            "config": {"limit": limit, "data_dir": data_dir, "add_bos": add_bos, "max_length": scorer.max_length,
                       "buckets": list(scorer.buckets), "tokens_per_batch": scorer.tokens_per_batch}}


def format_table(results: Mapping) -> str:
    """A readable table: one line per task and metric with value, stderr and speed."""
    lines = [f"{'task':<18} {'metric':<11} {'value':>10} {'stderr':>8} {'docs':>6} {'shots':>5} {'req/s':>8}",
             "-" * 72]
    for name, row in results["results"].items():
        for m in [k for k in row if k in ("acc", "acc_norm", "perplexity", "contains")]:
            err = row.get(f"{m}_stderr")
            value = f"{row[m]:>10.4f}" if abs(row[m]) < 1e5 else f"{row[m]:>10.3e}"
            lines.append(f"{name:<18} {m:<11} {value} {'' if err is None else f'{err:.4f}':>8} "
                         f"{row['num_docs']:>6} {row['num_fewshot']:>5} {row['requests_per_s']:>8.1f}")
    return "\n".join(lines)
