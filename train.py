"""Pretrain Hymba.

    python train.py --config configs/tiny.py --workdir /tmp/hymba-tiny [--config.num_steps=1000 ...]

Any config key can be overridden on the command line (`--config.model.hidden_size=256`,
`--config.data.source=tfds --config.data.tfds_name=lm1b`, `--config.init_from_hf=PATH`); unknown keys and
invalid values stop the program before any work, naming the key. Running again with the same workdir
resumes from its latest checkpoint; a workdir whose checkpoints cannot be resumed is refused (exit status
1, the reason and the remedy in one message), and `--start_over` moves its checkpoints and logs aside
and starts from step 0. Faults (NaN/inf losses, failed checkpoint writes) stop the run with a non-zero
exit status and one line naming the cause. See docs/training.md.

Multi-host: every process runs the same command. On a Cloud TPU pod slice or under SLURM the processes
find each other from the environment; elsewhere pass --coordinator_address=HOST:PORT (process 0's),
--num_processes and --process_id. See docs/launch.md.
"""

from __future__ import annotations

import json
import os

from absl import app, flags

from hymba_jax import cli
from hymba_jax.train.config import TrainConfigError, base_config

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = cli.define_config(os.path.join(_HERE, "configs", "tiny.py"), "training config file (configs/*.py)",
                            known=base_config(), where="hymba_jax/train/config.py:base_config")
_WORKDIR = cli.define_workdir("directory for checkpoints, logs and plots", default="/tmp/hymba-tiny")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "multi-process: HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: how many processes in all")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's id in [0, num_processes)")
_JOIN_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "seconds to wait for all processes to join")
_START_OVER = flags.DEFINE_bool("start_over", False, "start from step 0 in a workdir that has checkpoints: "
                                "they and the logs are moved into <workdir>/previous-<n>/ first (nothing is "
                                "deleted); without it the run resumes, or refuses when it cannot")


def main() -> None:
    import jax

    from hymba_jax import distributed
    from hymba_jax.parallel import MeshError
    from hymba_jax.checkpoint import CheckpointError
    from hymba_jax.train.loop import TrainingError, train
    from hymba_jax.train.step import StepDoesNotFit

    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               timeout_s=_JOIN_TIMEOUT.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    try:
        result = train(_CONFIG.value, _WORKDIR.value, start_over=_START_OVER.value)
    except (TrainConfigError, MeshError, StepDoesNotFit) as e:
        raise SystemExit(f"config error: {e}") from None
    except (TrainingError, CheckpointError) as e:
        raise SystemExit(f"training stopped: {e}") from None
    if jax.process_index() == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main)
