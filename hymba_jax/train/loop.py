"""The pretraining loop: data, sharded state, resume, jitted steps, validation, checkpoints, metrics.

    train(config, workdir)

Resumes from the latest restorable checkpoint in `workdir` when there is one (no flag), else starts
from random weights or `config.init_from_hf`. SIGTERM (and SIGINT) finish the current step, save a
checkpoint, wait for it to be written and return. Only process 0 writes logs.

Faults stop the run with TrainingError or CheckpointError (train.py exits non-zero with the message)
and never cost a good checkpoint: `max_consecutive_skips` non-finite steps in a row (each one skipped
by the step, state unchanged), a failed checkpoint write (noticed after the step during which it
failed), a workdir whose checkpoints do not restore or do not fit the model. `start_over=True` is the
one way to begin again in a used workdir: its checkpoints and logs are moved into `previous-<n>/`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from hymba_jax import compilation_cache
from hymba_jax.checkpoint import CHECKPOINT_DIR, Checkpointer
from hymba_jax.data import load_tokenizer, make_dataset
from hymba_jax.hf import load_hf_checkpoint
from hymba_jax.model.lm import param_shardings, uses_one_layer_body
from hymba_jax.ops.auto import default_platform, describe as describe_kernels, resolve_kernels
from hymba_jax.parallel import data_parallel_size, make_mesh, shard_batch
from hymba_jax.train import validation
from hymba_jax.train.config import TrainConfigError, model_config, validate_config
from hymba_jax.train.metrics import (LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsLogger,
                                     flops_per_token, peak_flops_per_device, plot_loss_curve)
from hymba_jax.train.program import TrainProgram, build_train_program
from hymba_jax.train.state import TrainState


class TrainingError(RuntimeError):
    """The run cannot go on (diverged, or the workdir is unusable); the message says why and what to do."""


class _StopRequest:
    """A request to save and stop, checked between steps.

    One process: SIGTERM or SIGINT sets it. Several processes (jax.distributed): a preemption notice
    (SIGTERM) reaches the processes at different steps, and a save is a collective, so they must stop at
    the same step. JAX's preemption service (started by jax.distributed.initialize, which then owns
    SIGTERM) propagates the notice and names the step at which all of them stop
    (`multihost_utils.reached_preemption_sync_point`, asked once per step by every process).
    """

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}
        self._agreed = jax.process_count() > 1 and jax.distributed.is_initialized()

    def __enter__(self):
        for sig in (signal.SIGINT,) if self._agreed else (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process gets the same answer at the same step)."""
        if self._agreed and self.signal is None and multihost_utils.reached_preemption_sync_point(step):
            self.signal = signal.SIGTERM
        return self.signal is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_batch_layout(config: ml_collections.ConfigDict, mesh) -> None:
    """The global batch must split evenly into microbatches on every data-parallel device."""
    ways = data_parallel_size(mesh, config.axis_rules) * config.grad_accum_steps
    if config.batch_size % ways:
        raise TrainConfigError(
            f"batch_size={config.batch_size}: must be a multiple of grad_accum_steps ({config.grad_accum_steps}) "
            f"x data-parallel devices ({ways // config.grad_accum_steps})")
    if config.batch_size % jax.process_count():
        raise TrainConfigError(f"batch_size={config.batch_size}: must be a multiple of the {jax.process_count()} "
                               "processes")


def train(config: ml_collections.ConfigDict, workdir: str | Path, start_over: bool = False) -> dict[str, Any]:
    """Train to `config.num_steps` (or until SIGTERM). Returns the last validation metrics and step.

    start_over: begin at step 0 even though `workdir` has checkpoints; they and the logs are moved into
    `<workdir>/previous-<n>/` first (nothing is deleted).
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise TrainingError(f"--workdir {workdir}: is a file, not a directory; give a directory (it is created "
                            "when missing)")
    cache_dir = compilation_cache.enable(config.compilation_cache_dir)
    validate_config(config, jax.device_count())
    mesh = make_mesh(dict(config.mesh), dcn_shape=dict(config.dcn_mesh))
    check_batch_layout(config, mesh)
    tokenizer = load_tokenizer(config.data)
    model_cfg = model_config(config, tokenizer.vocab_size)
    program = build_train_program(config, model_cfg, mesh)
    batch_sh = program.batch_sharding
    workdir.mkdir(parents=True, exist_ok=True)
    if start_over:
        _move_aside(workdir)

    kernels_cfg = resolve_kernels(model_cfg)   # checkpoints keep model_cfg: "auto" resolves where it runs
    # The step needs only the shapes of the state and the batch: it is traced and compiled (a minute or
    # more on a cold cache) on a thread of its own while the data pipeline starts and the state is
    # initialised or restored. The thread is not a daemon: a run refused meanwhile exits when the compile
    # is done (a daemon thread inside XLA's compile can crash the interpreter's exit).
    background = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_train_step")
    compiling = background.submit(program.compile, kernels_cfg, (program.abstract_state(), program.abstract_batch(
        config.batch_size, config.seq_len)), device_memory_limit(), cache_dir)
    background.shutdown(wait=False)
    train_iter = iter(make_dataset(config.data, tokenizer, split="train", global_batch_size=config.batch_size,
                                   seq_len=config.seq_len, seed=config.seed))
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
        state = _initial_state(config, program, checkpointer, train_iter)
    except BaseException:
        checkpointer.close()
        raise
    start = int(jax.device_get(state.step))

    eval_step = program.eval_step(kernels_cfg)
    logger = MetricsLogger(workdir, start, config.num_steps)
    logger.message(f"model {model_cfg.num_layers} layers x {model_cfg.hidden_size}, "
                   f"{_count(state.params) / 1e6:.2f}M parameters; mesh {dict(mesh.shape)}; "
                   f"{'resumed at' if start else 'starting at'} step {start} of {config.num_steps}")
    logger.message(f"{describe_kernels(kernels_cfg, model_cfg)}; compilation cache "
                   f"{cache_dir or 'off'}")

    def evaluate(step: int) -> dict:
        batches = validation.split_batches(config.data, tokenizer, "validation",
                                           global_batch_size=config.batch_size, seq_len=config.seq_len)
        result = validation.summary(*validation.loss_sums(eval_step, state.params, batches, batch_sh,
                                                          max_batches=config.eval_batches))
        logger.write("eval", step, result)
        return result

    tokens_per_step = config.batch_size * config.seq_len
    flops = flops_per_token(model_cfg, config.seq_len)
    peak = peak_flops_per_device(config.peak_flops_per_device)
    pending: list[dict] = []
    last_eval: dict = {}
    step = start
    skips = 0   # consecutive skipped (non-finite) steps, as of the last logged step
    profiler = _StepProfiler(workdir / TENSORBOARD_DIR, first=start + PROFILE_AFTER + 1, count=config.profile_steps,
                             logger=logger)
    with _StopRequest() as stop, _closing(checkpointer, logger, profiler):
        # The iterator is advanced only right before a step, so a checkpoint's data position is its step.
        batch = next(train_iter)
        compiled, kernels_cfg, notes = compiling.result()
        for note in notes:
            logger.message(note)
        logger.write("run", start, {"platform": default_platform(), "scan_backend": kernels_cfg.scan_backend,
                                    "attention_backend": kernels_cfg.attention_backend,
                                    "scan_layers": kernels_cfg.scan_layers,
                                    "one_layer_body": uses_one_layer_body(kernels_cfg), "remat": kernels_cfg.remat,
                                    "compilation_cache": cache_dir})
        tick, tick_step = time.perf_counter(), start
        while step < config.num_steps and not stop.reached(step):
            batch = batch if batch is not None else next(train_iter)
            profiler.before(step + 1)
            state, metrics = compiled(state, shard_batch(batch, batch_sh))
            batch = None
            step += 1
            profiler.after(step, state)
            pending.append(metrics)
            checkpointer.check()
            # The first step is always logged: it says when training really started, and its loss.
            if step % config.log_every == 0 or step == config.num_steps or step == start + 1:
                values = jax.device_get(pending)
                now = time.perf_counter()
                tokens_per_s = tokens_per_step * (step - tick_step) / (now - tick)
                skipped = [bool(v["skipped"]) for v in values]
                applied = [v for v, s in zip(values, skipped) if not s]   # skipped steps' loss is NaN
                record = {k: sum(float(v[k]) for v in applied) / len(applied) if applied else None
                          for k in values[0] if k != "skipped"}
                record["lr"] = float(values[-1]["lr"])
                record["skipped"] = sum(skipped)
                record["tokens_per_s"] = tokens_per_s
                record["mfu"] = flops * tokens_per_s / (peak * jax.device_count()) if peak else None
                logger.write("train", step, record)
                logger.progress(step, record["loss"], tokens_per_s)
                pending, tick, tick_step = [], now, step
                for s in skipped:
                    skips = skips + 1 if s else 0
                if any(skipped):
                    logger.message(f"step {step}: skipped {sum(skipped)} of the last {len(values)} steps "
                                   "(loss or gradient norm NaN or inf; parameters and optimizer unchanged)")
                if skips >= config.max_consecutive_skips:
                    raise TrainingError(
                        f"the loss or gradient norm was NaN or inf for {skips} steps in a row up to step {step} "
                        f"(max_consecutive_skips={config.max_consecutive_skips}): the run stops. Those updates "
                        f"were skipped, so the parameters are step {step - skips}'s; the last checkpoint is "
                        f"step {checkpointer.manager.latest_step()}. Lower optimizer.learning_rate "
                        f"({config.optimizer.learning_rate}) or check the data, then run again to resume")
            if config.eval_every and step % config.eval_every == 0 and step < config.num_steps:
                eval_start = time.perf_counter()
                last_eval = evaluate(step)
                tick += time.perf_counter() - eval_start   # throughput counts training time only
            if step % config.checkpoint_every == 0:
                checkpointer.save(state, train_iter, config, model_cfg)
        if stop.signal is not None:
            logger.message(f"received signal {stop.signal}: saving step {step} and exiting")
        elif not _finished_and_evaluated(logger, start, config.num_steps):
            last_eval = evaluate(step)
        else:   # a finished workdir run again: its final evaluation is logged already
            last_eval = logger.record("eval", step) or {}
        checkpointer.save(state, train_iter, config, model_cfg)
        checkpointer.wait()
    if jax.process_index() == 0 and stop.signal is None:
        plot_loss_curve(workdir)
    return {"step": step, "stopped_by_signal": stop.signal, **{f"val_{k}": v for k, v in last_eval.items()}}


PROFILE_AFTER = 1   # profile_steps start after this many steps of a run (the first one warms up)


class _StepProfiler:
    """Traces `count` steps from step `first` with jax.profiler into `directory` (TensorBoard's Profile tab
    reads it; `benchmarks/profile_summary.py DIR --steps count` groups the GPU kernels). count 0: off."""

    def __init__(self, directory: Path, first: int, count: int, logger: MetricsLogger):
        self.directory, self.first, self.last, self.logger = directory, first, first + count - 1, logger
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first and self.last >= self.first:
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True

    def after(self, step: int, state) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            self.logger.message(f"profiled steps {self.first}-{self.last} into {self.directory} (TensorBoard's "
                                f"Profile tab; their tokens/s include the tracing)")

    def close(self) -> None:
        if self.active:   # the run ended inside the profiled steps
            jax.profiler.stop_trace()
            self.active = False


@contextlib.contextmanager
def _closing(checkpointer: Checkpointer, logger: MetricsLogger, profiler: _StepProfiler):
    """Closes them however the run ends; closing waits for a checkpoint write in flight, so a run stopped
    by an error still keeps the last step it saved."""
    try:
        yield
    finally:
        profiler.close()
        logger.close()
        checkpointer.close()


def _finished_and_evaluated(logger: MetricsLogger, start: int, num_steps: int) -> bool:
    """Whether the run resumed at its last step with that step's evaluation logged (process 0 reads the
    log; every process gets its answer, since evaluating is a collective)."""
    done = np.asarray(start == num_steps and logger.record("eval", num_steps) is not None)
    if jax.process_count() > 1:
        done = multihost_utils.broadcast_one_to_all(done)
    return bool(done)


def _move_aside(workdir: Path) -> None:
    """--start_over: moves the checkpoints, metrics, TensorBoard events, loss curve and eval results of
    `workdir` into a new `previous-<n>/` inside it (process 0; the others wait)."""
    if jax.process_index() == 0:
        names = [CHECKPOINT_DIR, METRICS_FILE, TENSORBOARD_DIR, LOSS_CURVE_FILE]
        present = [workdir / n for n in names if (workdir / n).exists()] + sorted(workdir.glob("eval_*.json"))
        if present:
            n = 0
            while (workdir / f"previous-{n}").exists():
                n += 1
            target = workdir / f"previous-{n}"
            target.mkdir()
            for path in present:
                path.rename(target / path.name)
            logging.warning("start_over: moved %s into %s", ", ".join(p.name for p in present), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("start_over")


def _initial_state(config: ml_collections.ConfigDict, program: TrainProgram, checkpointer: Checkpointer,
                   train_iter) -> TrainState:
    """The latest restorable checkpoint's state, else a new one (from `config.init_from_hf` when set)."""
    state = checkpointer.restore_latest(program.state_shardings, program.abstract_state(), train_iter,
                                        model_config=program.model_config)
    if state is not None:
        return state
    params = None
    if config.init_from_hf:
        _, params = load_hf_checkpoint(config.init_from_hf, dtype=program.model_config.param_dtype,
                                       shardings=lambda c: param_shardings(c, program.mesh, program.rules))
        logging.info("initialised from %s", config.init_from_hf)
    return program.init_state(jax.random.key(config.seed), params)


def device_memory_limit() -> Optional[int]:
    """Bytes a local device lets JAX allocate (None where the backend does not say, e.g. the CPU)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_limit")


def _count(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
