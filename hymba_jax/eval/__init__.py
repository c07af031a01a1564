"""JAX-native evaluation: a batched log-likelihood scorer, greedy generation, the paper's benchmark tasks
in lm-evaluation-harness's formats, synthetic recall tests, and (optional) a harness adapter."""

from hymba_jax.eval.evaluator import encode_pair, evaluate, format_table, generate_texts, loglikelihood_texts
from hymba_jax.eval.generate import greedy_generate
from hymba_jax.eval.scorer import LogLikelihood, Scorer
from hymba_jax.eval.tasks import PAPER_SUITE, TASKS, Request, Task, get_task
from hymba_jax.eval.tokenizer import AsciiTokenizer

__all__ = [
    "AsciiTokenizer", "LogLikelihood", "PAPER_SUITE", "Request", "Scorer", "TASKS", "Task", "encode_pair",
    "evaluate", "format_table", "generate_texts", "get_task", "greedy_generate",
    "loglikelihood_texts",
]
