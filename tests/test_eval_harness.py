"""A real lm_eval run (CLI) of the `hymba_jax` adapter on local task files with the tiny fixture model,
compared request by request with our native evaluation. Skipped when lm_eval is not installed."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

from hymba_jax.downstream import AsciiTokenizer, Request, evaluate, generate_texts, loglikelihood_texts

from _eval_common import DATA, FIXTURE, MAX_LENGTH, REPO, tiny_scorer

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional (pip install hymba-jax[eval])")
HARNESS_TASKS = ["hymba_test_arc", "hymba_test_lambada", "hymba_test_gen", "hymba_test_rolling"]


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval")
    env = dict(os.environ, HF_HOME=str(out / "hf"), HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "hymba_jax.downstream.harness", "run", "--model", "hymba_jax", "--model_args",
           f"checkpoint={FIXTURE},tokenizer=ascii,max_length={MAX_LENGTH}", "--tasks", *HARNESS_TASKS,
           "--include_path", ".", "--output_path", str(out / "results"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=DATA, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.load(open(glob.glob(str(out / "results" / "*" / "results_*.json"))[0]))["results"]
    samples = {t: [json.loads(line) for line in open(glob.glob(str(out / "results" / "*" / f"samples_{t}_*.jsonl"))[0])]
               for t in HARNESS_TASKS}
    for rows in samples.values():
        rows.sort(key=lambda r: r["doc_id"])
    return results, samples


def args_of(sample):
    return [sample["arguments"][f"gen_args_{i}"] for i in range(len(sample["arguments"]))]


def test_loglikelihood_requests_match_native(harness_run):
    results, samples = harness_run
    tok = AsciiTokenizer()
    native = evaluate(tiny_scorer(), tok, ["arc_easy", "lambada_openai"], data_dir=str(DATA))["results"]
    for task, name, metrics in [("hymba_test_arc", "arc_easy", ("acc", "acc_norm")),
                                ("hymba_test_lambada", "lambada_openai", ("acc", "perplexity"))]:
        for sample in samples[task]:
            pairs = [(a["arg_0"], a["arg_1"]) for a in args_of(sample)]
            ours = loglikelihood_texts(tiny_scorer(), tok, pairs)
            theirs = [(float(r[0][0]), r[0][1] == "True") for r in sample["resps"]]
            for o, (lp, greedy) in zip(ours, theirs):
                assert o.logprob == pytest.approx(lp, abs=1e-3) and o.is_greedy == greedy
        for m in metrics:
            assert native[name][m] == pytest.approx(results[task][f"{m},none"], rel=1e-4)


def test_generate_until_matches_native(harness_run):
    _, samples = harness_run
    requests = [Request(args_of(s)[0]["arg_0"], until=("\n",), max_gen_toks=8) for s in samples["hymba_test_gen"]]
    ours = generate_texts(tiny_scorer(), AsciiTokenizer(), requests)
    assert ours == [s["filtered_resps"][0] for s in samples["hymba_test_gen"]]
    assert all(0 < len(text) <= 8 for text in ours)


def test_loglikelihood_rolling_matches_native(harness_run):
    results, samples = harness_run
    tok = AsciiTokenizer()
    docs = [args_of(s)[0]["arg_0"] for s in samples["hymba_test_rolling"]]
    ours = tiny_scorer().rolling_loglikelihood([tok.encode(d) for d in docs], tok.bos_id)
    theirs = [float(s["resps"][0][0]) for s in samples["hymba_test_rolling"]]
    assert ours == pytest.approx(theirs, abs=1e-3)
    assert len(docs[0]) > 2 * MAX_LENGTH  # more than one window
    words = sum(len(d.split()) for d in docs)
    assert results["hymba_test_rolling"]["word_perplexity,none"] == pytest.approx(math.exp(-sum(ours) / words), rel=1e-4)
