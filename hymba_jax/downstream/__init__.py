"""Downstream-task evaluation in JAX (what `python eval.py --config.task=benchmarks` runs): a batched
log-likelihood scorer, greedy generation for generative tasks, the paper's benchmark tasks in
lm-evaluation-harness's formats, synthetic recall tests, and (optional) a harness adapter."""

from hymba_jax.downstream.evaluator import encode_pair, evaluate, format_table, generate_texts, loglikelihood_texts
from hymba_jax.downstream.greedy import greedy_generate
from hymba_jax.downstream.scorer import LogLikelihood, Scorer
from hymba_jax.downstream.tasks import BENCHMARK_TASKS, PAPER_SUITE, Request, Task, get_task
from hymba_jax.downstream.tokenizer import AsciiTokenizer

__all__ = [
    "AsciiTokenizer", "BENCHMARK_TASKS", "LogLikelihood", "PAPER_SUITE", "Request", "Scorer", "Task", "encode_pair",
    "evaluate", "format_table", "generate_texts", "get_task", "greedy_generate", "loglikelihood_texts",
]
