"""Compile the real train step for a TPU topology ahead of time, on a machine without TPUs, and report
per-chip memory and FLOPs: whether a config fits before a pod is reserved.

    python -m hymba_jax.aot --config configs/hymba_1p5b.py --topology v5p:4x4x4 [--config.mesh.fsdp=-1 ...]

Needs libtpu matching the installed jax (kept out of the project's environment, see docs/sharding.md):

    pip install --no-deps --target .tpu_site "libtpu==0.0.42.*"        # jax 0.10.2
    PYTHONPATH=.tpu_site python -m hymba_jax.aot --config configs/hymba_1p5b.py --topology v5p:4x4x4

The train state, batch and step are exactly train.py's (`build_train_program`: the config's optimizer,
mesh, rules, remat, dtypes and gradient accumulation); nothing is allocated or run. The memory is what XLA's
compiled module needs on each chip: arguments (this chip's shard of the train state and batch),
outputs (the new state; donated, so they alias the arguments), temporaries (activations, gradients,
collectives' buffers) and code. FLOPs are XLA's count for one chip's program of one step.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

import jax
import ml_collections

from hymba_jax.ops.auto import resolve_kernels
from hymba_jax.parallel import MeshError, collective_operands, make_mesh
from hymba_jax.train.config import TrainConfigError, model_config, validate_config
from hymba_jax.train.metrics import flops_per_token
from hymba_jax.train.program import build_train_program
from hymba_jax.train.step import StepDoesNotFit, needed_bytes

# HBM per chip (bytes), by the topology name's generation prefix.
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5litepod": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}
DEFAULT_VOCAB = 32001   # the paper's Llama-2 tokenizer (+1), used when the config leaves model.vocab_size unset


@dataclasses.dataclass
class AotReport:
    """Per-chip numbers of one compiled train step (bytes and FLOPs)."""

    topology: str
    chips: int
    mesh: dict
    params: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    total_bytes: int        # what the chip needs (train.step.needed_bytes): the sum above less the aliases
    hbm_bytes: Optional[int]
    flops: float            # XLA's count for this chip's program
    model_flops: float      # the 6N + attention formula (train.metrics) for this chip's share of the batch
    collectives: dict       # op -> number of operands in the compiled module
    compile_s: float
    scan_backend: str       # the kernels compiled ("auto" resolved for the TPU)
    attention_backend: str
    remat: str              # as compiled ("auto": none if it fits the chip's HBM, else full)

    def summary(self) -> str:
        gib = lambda b: f"{b / 2**30:8.2f} GiB"
        fits = "" if self.hbm_bytes is None else (
            f" of {self.hbm_bytes / 2**30:.0f} GiB HBM ({100 * self.total_bytes / self.hbm_bytes:.0f}%): "
            + ("fits" if self.total_bytes <= self.hbm_bytes else "DOES NOT FIT"))
        return "\n".join([
            f"topology {self.topology}: {self.chips} chips, mesh {self.mesh}, {self.params / 1e9:.3f}B parameters, "
            f"compiled in {self.compile_s:.0f} s; scan {self.scan_backend}, attention {self.attention_backend}, "
            f"remat {self.remat}",
            "per chip:",
            f"  arguments    {gib(self.argument_bytes)}   (train state shard + batch shard)",
            f"  outputs      {gib(self.output_bytes)}   ({gib(self.alias_bytes).strip()} aliased to donated arguments)",
            f"  temporaries  {gib(self.temp_bytes)}",
            f"  code         {gib(self.code_bytes)}",
            f"  total        {gib(self.total_bytes)}{fits}",
            f"  FLOPs/step   {self.flops:.3e} (XLA), {self.model_flops:.3e} (model formula)",
            "  collectives  " + ", ".join(f"{k} {v}" for k, v in self.collectives.items() if v),
        ])


def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a TPU topology such as 'v5p:4x4x4' (needs libtpu; no TPU)."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                 num_slices=num_slices).devices)
    except Exception as e:   # no libtpu, or a name libtpu does not know
        raise RuntimeError(f"--topology={topology}: cannot describe it ({type(e).__name__}: {str(e)[:300]}). "
                           "It needs libtpu matching jax (docs/sharding.md) and a name like v5p:2x2x1, "
                           "v4:2x2x2, v5e:2x2 or v6e:4x4") from None


def compile_train_step(config: ml_collections.ConfigDict, devices: list, topology: str = "",
                       vocab_size: int = DEFAULT_VOCAB) -> AotReport:
    """Lower and compile train.py's step for `devices` (e.g. `tpu_devices(...)`); returns its report."""
    import time

    validate_config(config)
    mesh = make_mesh(dict(config.mesh), devices=devices, dcn_shape=dict(config.dcn_mesh))
    cfg = resolve_kernels(model_config(config, config.model.vocab_size or vocab_size), devices[0].platform)
    program = build_train_program(config, cfg, mesh)
    state = program.abstract_state()
    generation = topology.split(":")[0]
    start = time.perf_counter()
    try:
        compiled, cfg, notes = program.compile(cfg, (state, program.abstract_batch(config.batch_size, config.seq_len)),
                                               HBM_BYTES.get(generation))
    except StepDoesNotFit as e:
        raise SystemExit(f"{topology}: DOES NOT FIT: {e}") from None
    seconds = time.perf_counter() - start
    print("\n".join(notes), file=sys.stderr)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tokens_per_chip = config.batch_size * config.seq_len / len(devices)
    return AotReport(
        topology=topology, chips=len(devices), mesh=dict(mesh.shape),
        params=sum(x.size for x in jax.tree.leaves(state.params)),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, total_bytes=needed_bytes(memory),
        hbm_bytes=HBM_BYTES.get(generation),
        flops=float(cost.get("flops", 0.0)), model_flops=flops_per_token(cfg, config.seq_len) * tokens_per_chip,
        collectives={k: len(v) for k, v in collective_operands(compiled.as_text()).items()}, compile_s=seconds,
        scan_backend=cfg.scan_backend, attention_backend=cfg.attention_backend, remat=cfg.remat)


def main() -> None:
    from absl import flags

    FLAGS = flags.FLAGS
    devices = tpu_devices(FLAGS.topology, FLAGS.num_slices)
    try:
        report = compile_train_step(FLAGS.config, devices, FLAGS.topology, FLAGS.vocab_size)
    except (TrainConfigError, MeshError) as e:
        raise SystemExit(f"config error: {e}") from None
    print(report.summary())
    if FLAGS.json:
        print(json.dumps(dataclasses.asdict(report)))


if __name__ == "__main__":
    from absl import flags

    from hymba_jax import cli
    from hymba_jax.train.config import base_config

    cli.define_config(None, "training config file (configs/*.py), as in train.py", known=base_config(),
                      where="hymba_jax/train/config.py:base_config")
    flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology, e.g. v5p:4x4x4, v4:2x2x2, v5e:4x4, v6e:4x4")
    flags.DEFINE_integer("num_slices", 1, "slices joined over DCN (set config.dcn_mesh to use them)")
    flags.DEFINE_integer("vocab_size", DEFAULT_VOCAB, "vocabulary when the config leaves model.vocab_size unset")
    flags.DEFINE_bool("json", False, "also print the report as one JSON line")
    flags.mark_flags_as_required(["config"])
    cli.run(main)
