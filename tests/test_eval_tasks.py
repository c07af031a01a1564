"""Task prompts, few-shot contexts and metrics match lm-evaluation-harness's definitions (hand-written
expectations on the small task files in tests/data/eval)."""

from __future__ import annotations

import math
import random

import pytest

from hymba_jax.downstream import AsciiTokenizer, PAPER_SUITE, encode_pair, evaluate, format_table, get_task
from hymba_jax.downstream.data import load_task_data
from hymba_jax.downstream.metrics import aggregate, contains, multiple_choice
from hymba_jax.downstream.scorer import LogLikelihood
from hymba_jax.downstream.tasks import fewshot_examples

from _eval_common import DATA, tiny_scorer


def requests_of(name, num_fewshot=None):
    task = get_task(name)
    data = load_task_data(task, DATA)
    shots = task.num_fewshot if num_fewshot is None else num_fewshot
    fewshot = fewshot_examples(task, data.docs, data.fewshot_pool, shots, data.pool_is_eval_split)
    return task, data.docs, [task.requests(d, f) for d, f in zip(data.docs, fewshot)]


def pairs(reqs):
    return [(r.context, r.continuation) for r in reqs]


def test_arc():
    task, docs, reqs = requests_of("arc_easy")
    assert pairs(reqs[0]) == [("Question: What melts ice?\nAnswer:", " heat"),
                              ("Question: What melts ice?\nAnswer:", " cold air"),
                              ("Question: What melts ice?\nAnswer:", " salt water"),
                              ("Question: What melts ice?\nAnswer:", " dark")]
    assert [task.gold(d) for d in docs] == [0, 1, 1]
    _, _, reqs = requests_of("arc_challenge")
    assert reqs[0][0].context == "Question: Why do we see lightning before thunder?\nAnswer:"


def test_piqa():
    task, docs, reqs = requests_of("piqa")
    assert pairs(reqs[1]) == [("Question: Dry wet hands.\nAnswer:", " Use a wet towel."),
                              ("Question: Dry wet hands.\nAnswer:", " Use a dry towel.")]
    assert [task.gold(d) for d in docs] == [0, 1]


def test_hellaswag_preprocessing():
    task, docs, reqs = requests_of("hellaswag")
    ctx = "Baking cookies: A man mixes flour and sugar in a bowl. He"
    assert pairs(reqs[0]) == [(ctx, " puts the dough in the oven."), (ctx, " swims. away."),
                              (ctx, " reads a book."), (ctx, " sings loudly.")]
    assert reqs[1][0].context == "Home and Garden: How to water a plant. Fill a can. Then"
    assert [task.gold(d) for d in docs] == [0, 0]


def test_winogrande_partial_scoring():
    task, docs, reqs = requests_of("winogrande")
    assert pairs(reqs[0]) == [("The cup fell off the table because the cup", " was tilted."),
                              ("The cup fell off the table because the table", " was tilted.")]
    assert [task.gold(d) for d in docs] == [1, 0]
    assert task.metrics == ("acc",)


def test_mmlu_five_shot_first_n_of_subject():
    task, docs, reqs = requests_of("mmlu")
    expected = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                "3*3?\nA. 6\nB. 8\nC. 9\nD. 12\nAnswer: C\n\n"
                "10-4?\nA. 6\nB. 5\nC. 4\nD. 7\nAnswer: A\n\n"
                "8/2?\nA. 2\nB. 3\nC. 6\nD. 4\nAnswer: D\n\n"
                "5+5?\nA. 10\nB. 55\nC. 0\nD. 25\nAnswer: A\n\n"
                "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert pairs(reqs[0]) == [(expected, " A"), (expected, " B"), (expected, " C"), (expected, " D")]
    assert reqs[1][0].context.startswith("The following are multiple choice questions (with answers) about "
                                         "high school physics.\n\nUnit of power?\nA. watt\n")
    with pytest.raises(ValueError, match="subject='high_school_physics'"):
        requests_of("mmlu", num_fewshot=6)


def test_squad_completion_one_shot_generation():
    task, docs, reqs = requests_of("squad_completion")
    rnd = random.Random(1234)  # the harness's default sampler: n + 1 from the eval split, doc removed
    for doc, (req,) in zip(docs, reqs):
        shot = [d for d in rnd.sample(docs, 2) if d != doc][0]
        assert req.context == f"{shot['text'].strip()} {shot['value'].strip()}\n\n{doc['text'].strip()}"
        assert req.until == ("\n",) and req.max_gen_toks == 48 and req.continuation == ""


def test_lambada_last_word():
    _, _, reqs = requests_of("lambada_openai")
    assert pairs(reqs[0]) == [("She opened the door and saw her", " cat")]


def test_metrics_by_hand():
    assert multiple_choice([-1.0, -2.0], ["a", "bbbbb"], 1) == {"acc": 0.0, "acc_norm": 1.0}
    assert multiple_choice([-3.0, -3.0], ["aa", "bb"], 0) == {"acc": 1.0, "acc_norm": 1.0}  # ties: first
    assert aggregate("perplexity", [-1.0, -3.0]) == pytest.approx(math.e ** 2)
    assert aggregate("acc", [1.0, 0.0, 0.0, 1.0]) == 0.5
    assert contains("The answer is PARIS.", ["Paris"]) == 1.0
    assert contains("1+1=2", ["1+1"]) == 1.0 and contains("11", ["1+1"]) == 0.0


def test_encode_pair_moves_trailing_space():
    tok = AsciiTokenizer()
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert ctx == [tok.bos_id] + tok.encode("Answer:") and cont == tok.encode(" yes")
    assert encode_pair(tok, "", "hi") == ([tok.bos_id], tok.encode("hi"))
    assert encode_pair(tok, "a", "b", add_bos=False) == (tok.encode("a"), tok.encode("b"))
    assert tok.decode(tok.encode("Hi there!\n~")) == "Hi there!\n~"
    with pytest.raises(ValueError, match="not printable ASCII"):
        tok.encode("café")


class LengthScorer:
    """Stands in for Scorer: log p = -(continuation tokens), greedy when it has <= 4 tokens."""

    max_length, buckets, tokens_per_batch = 64, (64,), 64

    def loglikelihood(self, requests, desc=""):
        return [LogLikelihood(-float(len(cont)), len(cont) <= 4) for _, cont in requests]


def test_evaluate_aggregates_like_the_harness():
    out = evaluate(LengthScorer(), AsciiTokenizer(), ["arc_easy", "lambada_openai"], data_dir=str(DATA))
    arc = out["results"]["arc_easy"]
    # lls: doc 1 [-5, -9, -11, -5] gold 0: acc 1, acc_norm argmax(-5/4, -9/8, -11/10, -5/4) = 2 -> 0;
    # doc 2 [-5, -5, -4] gold 1: 0, 0; doc 3 [-6, -6] gold 1: 0, 0.
    assert arc["acc"] == pytest.approx(1 / 3) and arc["acc_norm"] == 0.0
    assert arc["num_docs"] == 3 and arc["num_requests"] == 9
    assert arc["acc_stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    lam = out["results"]["lambada_openai"]
    assert lam["acc"] == 0.5 and lam["perplexity"] == pytest.approx(math.exp(5.0))  # " cat", " water"
    table = format_table(out)
    assert "arc_easy" in table and "acc_norm" in table and "perplexity" in table


def test_full_suite_runs_on_the_tiny_model():
    out = evaluate(tiny_scorer(), AsciiTokenizer(), PAPER_SUITE, data_dir=str(DATA), limit=2)
    assert list(out["results"]) == list(PAPER_SUITE)
    for name, row in out["results"].items():
        for metric in get_task(name).metrics:
            value = row[metric]
            assert value > 1.0 if metric == "perplexity" else 0.0 <= value <= 1.0
        assert row["num_docs"] == (1 if name == "arc_challenge" else 2)
    assert out["results"]["mmlu"]["num_fewshot"] == 5 and out["results"]["squad_completion"]["num_fewshot"] == 1


@pytest.mark.slow   # two processes each compile the tiny model's scoring buckets (70 s on the shared CPU)
def test_eval_py_benchmarks_is_the_library_run(tmp_path):
    """`python eval.py --config.task=benchmarks` (the one command for a benchmark run) gives the library's
    numbers for the same checkpoint, tokenizer, length and shots; its settings parse from the command line."""
    import json
    import subprocess
    import sys

    from hymba_jax.downstream import Scorer
    from hymba_jax.loading import load_model
    from _eval_common import FIXTURE, REPO

    out = tmp_path / "result.json"
    flags = [f"--config.hf_checkpoint={FIXTURE}", "--config.task=benchmarks", "--config.tasks=arc_easy,piqa",
             f"--config.task_data_dir={DATA}", "--config.data.tokenizer=ascii", "--config.seq_len=32",
             "--config.num_fewshot=piqa=1", "--config.tokens_per_batch=256", f"--config.output={out}",
             "--config.compilation_cache_dir="]
    proc = subprocess.run([sys.executable, str(REPO / "eval.py"), *flags], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())["results"]
    config, params = load_model(str(FIXTURE))
    want = evaluate(Scorer(config, params, max_length=32, tokens_per_batch=256, progress=False), AsciiTokenizer(),
                    ["arc_easy", "piqa"], data_dir=str(DATA), num_fewshot={"piqa": 1})["results"]
    assert got["piqa"]["num_fewshot"] == 1 and got["arc_easy"]["num_docs"] == want["arc_easy"]["num_docs"]
    for task in want:
        for metric in get_task(task).metrics:
            assert got[task][metric] == pytest.approx(want[task][metric], abs=1e-6), (task, metric)
