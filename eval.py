"""Evaluate a trained Hymba: an Orbax training workdir or a Hugging Face checkpoint.

    python eval.py --workdir /tmp/hymba-tiny                              # held-out split perplexity
    python eval.py --workdir /tmp/hymba-tiny --config.files='("a.txt","b.jsonl")'
    python eval.py --config.hf_checkpoint=PATH       # its tokenizer.model, or --config.data.tokenizer=FILE
    python eval.py --config.hf_checkpoint=PATH \
        --config.task=benchmarks --config.tasks=arc_easy,piqa --config.task_data_dir=DIR --config.limit=100

Evaluations are registered in EVALUATIONS (name -> function(config, model) -> result dict);
`--config.task` picks one. 'perplexity' computes the token-weighted cross-entropy exactly as the training
loop's validation (same packing, batches and code), so on a workdir it reproduces the final validation
loss. 'benchmarks' runs the paper's tasks in lm-evaluation-harness formats (hymba_jax.downstream). The
result is printed as JSON and written to `--config.output` (default: <workdir>/eval_<task>.json).
`--workdir DIR` is train.py's flag and the same as `--config.workdir=DIR` (hymba_jax/cli.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from hymba_jax import cli, compilation_cache
from hymba_jax.checkpoint import CheckpointError, read_workdir_config
from hymba_jax.config import HymbaConfig
from hymba_jax.data import default_data_config
from hymba_jax.loading import load_model, load_tokenizer
from hymba_jax.ops.auto import describe as describe_kernels, resolve_kernels
from hymba_jax.parallel import DEFAULT_AXIS_RULES, batch_sharding, make_mesh
from hymba_jax.train import validation
from hymba_jax.train.step import make_eval_step


def eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "perplexity"
    c.workdir = ""            # an Orbax training workdir (train.py --workdir); --workdir sets it too
    c.hf_checkpoint = ""      # or a Hugging Face checkpoint directory
    c.split = "validation"    # 'validation', 'train' or 'all' (both) of the data source
    c.files = ()              # the user's .txt/.jsonl/.parquet files: evaluated whole (split 'all')
    c.batch_size = 0          # 0: the training config's (workdir) or 8
    c.seq_len = 0             # 0: the training config's (workdir) or 2048
    c.max_batches = 0         # 0: the training config's eval_batches (workdir) or -1; -1: all batches
    c.dtype = ""              # compute dtype; '': as trained (workdir) or float32
    c.scan_backend = ""       # '': as trained / the checkpoint's ('auto': this platform's fastest)
    c.attention_backend = ""  # '': as trained / the checkpoint's; e.g. 'xla' for the reference
    c.output = ""             # JSON result path; '': <workdir>/eval_<task>.json (nothing for HF)
    c.tasks = ""              # task=benchmarks: comma-separated harness-format tasks ('' = the paper's suite)
    c.task_data_dir = ""      # task=benchmarks: folder of <task>.jsonl ('' = Hugging Face datasets cache)
    c.limit = 0               # task=benchmarks: first N documents per task (0 = all)
    c.num_fewshot = ""        # task=benchmarks: shots per task where not the paper's, e.g. 'mmlu=0,piqa=5'
    c.tokens_per_batch = 8192  # task=benchmarks: tokens per scoring forward (rows = this // length bucket)
    c.add_bos = True          # task=benchmarks: start every context with the BOS id (as the harness does)
    # An HF checkpoint's data settings (a workdir brings its own); data.tokenizer '': its tokenizer.model.
    c.data = default_data_config()
    c.compilation_cache_dir = compilation_cache.DEFAULT_DIR   # compiled programs kept across runs; '' = off
    return c


@dataclasses.dataclass
class LoadedModel:
    config: HymbaConfig
    params: Any
    mesh: jax.sharding.Mesh
    tokenizer: Any
    data: ml_collections.ConfigDict   # data settings (source, packing) to evaluate with
    batch_size: int
    seq_len: int
    max_batches: int


def load_for_evaluation(config: ml_collections.ConfigDict) -> LoadedModel:
    """The model named by --workdir (--config.workdir) or --config.hf_checkpoint, with fp32 weights placed on
    all devices, and its tokenizer: the training data's for a workdir; --config.data.tokenizer, else the
    checkpoint's tokenizer.model, for a Hugging Face checkpoint."""
    source = cli.model_source(config)
    mesh = make_mesh({"data": -1})
    backends = {k: config[k] for k in ("scan_backend", "attention_backend") if config[k]}
    model_cfg, params = load_model(source, config.dtype or None, mesh=mesh, **backends)
    try:
        tokenizer = load_tokenizer(config.workdir) if config.workdir else load_tokenizer(
            config.hf_checkpoint, config.data.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"config error: {e}") from None
    if config.workdir:
        trained = read_workdir_config(config.workdir)
        data, batch, seq, max_batches = trained.data, trained.batch_size, trained.seq_len, trained.eval_batches
    else:
        data, batch, seq, max_batches = config.data, 8, 2048, -1
    data = ml_collections.ConfigDict(data.to_dict())
    if config.files:
        data.source, data.files = "files", list(config.files)
    return LoadedModel(model_cfg, params, mesh, tokenizer, data, config.batch_size or batch,
                       config.seq_len or seq, config.max_batches or max_batches)


def perplexity(config: ml_collections.ConfigDict, model: LoadedModel) -> dict:
    """Token-weighted cross-entropy and perplexity of `split` (or the user's files, whole)."""
    splits = {"validation": ["validation"], "train": ["train"], "all": ["train", "validation"]}
    if config.split not in splits:
        raise SystemExit(f"config error: split={config.split!r}: expected one of {sorted(splits)}")
    tokenizer = model.tokenizer
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"config error: the tokenizer has {tokenizer.vocab_size} pieces but the model only "
                         f"{model.config.vocab_size}; set --config.data.tokenizer to the model's tokenizer")
    sharding = batch_sharding(model.mesh, DEFAULT_AXIS_RULES)
    eval_step = make_eval_step(model.config, mesh=model.mesh,
                               param_shardings=jax.tree.map(lambda x: x.sharding, model.params),
                               batch_sharding=sharding)
    ce = weight = 0.0
    for split in splits["all" if config.files else config.split]:
        batches = validation.split_batches(model.data, tokenizer, split, global_batch_size=model.batch_size,
                                           seq_len=model.seq_len)
        c, w = validation.loss_sums(eval_step, model.params, batches, sharding, max_batches=model.max_batches,
                                    desc=f"perplexity ({split})")
        ce, weight = ce + c, weight + w
    return {**validation.summary(ce, weight), "split": "all" if config.files else config.split}


def unigram(config: ml_collections.ConfigDict, model: LoadedModel) -> dict:
    """The baseline a language model must beat: the unigram entropy of the training split's tokens and the
    cross-entropy on `split` of that unigram model (add-one smoothed), both in nats per token, counted
    over the same target positions (weights > 0) as the perplexity."""
    tokenizer = model.tokenizer
    counts = np.zeros(tokenizer.vocab_size, np.float64)
    for batch in validation.split_batches(model.data, tokenizer, "train", global_batch_size=model.batch_size,
                                          seq_len=model.seq_len):
        np.add.at(counts, batch["targets"][batch["weights"] > 0], 1)
    p = counts[counts > 0] / counts.sum()
    log_q = np.log((counts + 1) / (counts.sum() + len(counts)))
    ce = weight = 0.0
    for batch in validation.split_batches(model.data, tokenizer, config.split if config.split != "all" else "train",
                                          global_batch_size=model.batch_size, seq_len=model.seq_len):
        ce -= float((log_q[batch["targets"]] * batch["weights"]).sum())
        weight += float(batch["weights"].sum())
    return {"unigram_entropy_train": float(-(p * np.log(p)).sum()), "unigram_cross_entropy": ce / weight,
            "train_tokens": int(counts.sum()), "split": config.split}


def benchmarks(config: ml_collections.ConfigDict, model: LoadedModel) -> dict:
    """The paper's benchmarks in lm-evaluation-harness formats (hymba_jax.downstream, docs/evaluation.md);
    prompts longer than seq_len keep their last tokens. Prints a table; the result holds every metric."""
    from hymba_jax.downstream import PAPER_SUITE, Scorer, evaluate, format_table

    tasks = [t for t in config.tasks.split(",") if t] or list(PAPER_SUITE)
    try:
        shots = {k: int(v) for k, v in (kv.split("=") for kv in config.num_fewshot.split(",") if kv)}
    except ValueError:
        raise SystemExit(f"config error: num_fewshot={config.num_fewshot!r}: expected task=shots pairs like "
                         "'mmlu=0,piqa=5'") from None
    scorer = Scorer(model.config, model.params, max_length=model.seq_len, tokens_per_batch=config.tokens_per_batch,
                    progress=jax.process_index() == 0)
    result = evaluate(scorer, model.tokenizer, tasks, data_dir=config.task_data_dir or None,
                      limit=config.limit or None, num_fewshot=shots, add_bos=config.add_bos)
    if jax.process_index() == 0:
        print(format_table(result))
    return result


EVALUATIONS: dict[str, Callable[[ml_collections.ConfigDict, LoadedModel], dict]] = {
    "perplexity": perplexity, "unigram": unigram, "benchmarks": benchmarks}

_CONFIG = cli.define_config(eval_config(), "evaluation settings", where="eval.py:eval_config")
_WORKDIR = cli.define_workdir("training workdir to evaluate, as in train.py (the same as --config.workdir)")


def main() -> None:
    config = cli.settings(_CONFIG, _WORKDIR)
    if config.task not in EVALUATIONS:
        raise SystemExit(f"config error: task={config.task!r}: expected one of {sorted(EVALUATIONS)}")
    cache_dir = compilation_cache.enable(config.compilation_cache_dir)
    try:
        model = load_for_evaluation(config)
    except CheckpointError as e:
        raise SystemExit(f"checkpoint error: {e}") from None
    if jax.process_index() == 0:
        print(f"{describe_kernels(resolve_kernels(model.config), model.config)}; compilation cache "
              f"{cache_dir or 'off'}", file=sys.stderr)
    result = {"task": config.task, "source": config.workdir or config.hf_checkpoint,
              **EVALUATIONS[config.task](config, model)}
    output: Optional[str] = config.output or (
        str(Path(config.workdir) / f"eval_{config.task}.json") if config.workdir else None)
    if jax.process_index() == 0:
        print(json.dumps(result))
        if output:
            Path(output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    cli.run(main)
