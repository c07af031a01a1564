"""Evaluate a trained Hymba: an Orbax training workdir or a Hugging Face checkpoint.

    python eval.py --config.workdir=/tmp/hymba-tiny                       # held-out split perplexity
    python eval.py --config.workdir=/tmp/hymba-tiny --config.files='("a.txt","b.jsonl")'
    python eval.py --config.hf_checkpoint=PATH --config.data.tokenizer=tokenizer.model
    python eval.py --config.hf_checkpoint=PATH --config.data.tokenizer=tokenizer.model \
        --config.task=benchmarks --config.tasks=arc_easy,piqa --config.task_data_dir=DIR --config.limit=100

Tasks are registered in TASKS (name -> function(config, model) -> result dict); `--config.task` picks
one. 'perplexity' computes the token-weighted cross-entropy exactly as the training loop's validation
(same packing, batches and code), so on a workdir it reproduces the final validation loss. The result
is printed as JSON and written to `--config.output` (default: <workdir>/eval_<task>.json).
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
from absl import app, flags, logging
from ml_collections import config_flags

from hymba_jax.config import HymbaConfig
from hymba_jax.data import default_data_config, load_tokenizer
from hymba_jax.hf import load_hf_checkpoint
from hymba_jax.parallel import DEFAULT_AXIS_RULES, batch_sharding, make_mesh
from hymba_jax.train import validation
from hymba_jax.train.checkpoint import CheckpointError, read_workdir_config, restore_checkpoint_params
from hymba_jax.train.state import param_shardings
from hymba_jax.train.step import make_eval_step


def eval_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "perplexity"
    c.workdir = ""            # an Orbax training workdir (train.py --workdir)
    c.hf_checkpoint = ""      # or a Hugging Face checkpoint directory
    c.split = "validation"    # 'validation', 'train' or 'all' (both) of the data source
    c.files = ()              # the user's .txt/.jsonl/.parquet files: evaluated whole (split 'all')
    c.batch_size = 0          # 0: the training config's (workdir) or 8
    c.seq_len = 0             # 0: the training config's (workdir) or 2048
    c.max_batches = 0         # 0: the training config's eval_batches (workdir) or -1; -1: all batches
    c.dtype = ""              # compute dtype; '': as trained (workdir) or float32
    c.scan_backend = ""       # '': as trained / the checkpoint's; e.g. pallas_gpu on a GPU (docs/performance.md)
    c.attention_backend = ""  # '': as trained; 'cudnn' for the fused GPU kernel
    c.output = ""             # JSON result path; '': <workdir>/eval_<task>.json (nothing for HF)
    c.tasks = ""              # task=benchmarks: comma-separated harness-format tasks ('' = the paper's suite)
    c.task_data_dir = ""      # task=benchmarks: folder of <task>.jsonl ('' = Hugging Face datasets cache)
    c.limit = 0               # task=benchmarks: first N documents per task (0 = all)
    c.data = default_data_config()   # the data settings for an HF checkpoint (a workdir brings its own)
    return c


@dataclasses.dataclass
class LoadedModel:
    config: HymbaConfig
    params: Any
    mesh: jax.sharding.Mesh
    data: ml_collections.ConfigDict   # data settings (tokenizer, source) to evaluate with
    batch_size: int
    seq_len: int
    max_batches: int
    step: Optional[int] = None        # the workdir's checkpoint step (an earlier one when the latest is damaged)


def load_model(config: ml_collections.ConfigDict) -> LoadedModel:
    """The model named by --config.workdir or --config.hf_checkpoint, placed on all devices."""
    if bool(config.workdir) == bool(config.hf_checkpoint):
        raise SystemExit("config error: give exactly one of --config.workdir and --config.hf_checkpoint")
    mesh = make_mesh({"data": -1})
    if config.workdir:
        trained = read_workdir_config(config.workdir)
        step, model_cfg, params = restore_checkpoint_params(config.workdir, mesh=mesh)
        data, batch, seq, max_batches = trained.data, trained.batch_size, trained.seq_len, trained.eval_batches
        if jax.process_index() == 0:
            print(f"evaluating {config.workdir} at checkpoint step {step}", file=sys.stderr)
    else:
        model_cfg, params = load_hf_checkpoint(
            config.hf_checkpoint, shardings=lambda c: param_shardings(c, mesh, DEFAULT_AXIS_RULES))
        data, batch, seq, max_batches, step = config.data, 8, 2048, -1, None
    overrides = {k: config[k] for k in ("dtype", "scan_backend", "attention_backend") if config[k]}
    model_cfg = model_cfg.replace(**overrides)
    data = ml_collections.ConfigDict(data.to_dict())
    if config.files:
        data.source, data.files = "files", list(config.files)
    return LoadedModel(model_cfg, params, mesh, data, config.batch_size or batch, config.seq_len or seq,
                       config.max_batches or max_batches, step)


def perplexity(config: ml_collections.ConfigDict, model: LoadedModel) -> dict:
    """Token-weighted cross-entropy and perplexity of `split` (or the user's files, whole)."""
    splits = {"validation": ["validation"], "train": ["train"], "all": ["train", "validation"]}
    if config.split not in splits:
        raise SystemExit(f"config error: split={config.split!r}: expected one of {sorted(splits)}")
    tokenizer = load_tokenizer(model.data)
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
    tokenizer = load_tokenizer(model.data)
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
    """The paper's benchmarks in lm-evaluation-harness formats (hymba_jax.eval, docs/evaluation.md);
    prompts longer than seq_len keep their last tokens. Prints a table; the result holds every metric."""
    from hymba_jax.eval import PAPER_SUITE, Scorer, evaluate, format_table

    tasks = [t for t in config.tasks.split(",") if t] or list(PAPER_SUITE)
    scorer = Scorer(model.config, model.params, max_length=model.seq_len, progress=jax.process_index() == 0)
    result = evaluate(scorer, load_tokenizer(model.data), tasks, data_dir=config.task_data_dir or None,
                      limit=config.limit or None)
    if jax.process_index() == 0:
        print(format_table(result))
    return result


TASKS: dict[str, Callable[[ml_collections.ConfigDict, LoadedModel], dict]] = {
    "perplexity": perplexity, "unigram": unigram, "benchmarks": benchmarks}

_CONFIG = config_flags.DEFINE_config_dict("config", eval_config(), "evaluation settings", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)   # Orbax logs each restore at INFO; `-v 0` shows them
    config = _CONFIG.value
    if config.task not in TASKS:
        raise SystemExit(f"config error: task={config.task!r}: expected one of {sorted(TASKS)}")
    try:
        model = load_model(config)
    except CheckpointError as e:
        raise SystemExit(f"checkpoint error: {e}") from None
    step = {} if model.step is None else {"step": model.step}
    result = {"task": config.task, "source": config.workdir or config.hf_checkpoint, **step,
              **TASKS[config.task](config, model)}
    output: Optional[str] = config.output or (
        str(Path(config.workdir) / f"eval_{config.task}.json") if config.workdir else None)
    if jax.process_index() == 0:
        print(json.dumps(result))
        if output:
            Path(output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
