"""Pretrain Hymba.

    python train.py --config configs/tiny.py --workdir /tmp/hymba-tiny [--config.num_steps=1000 ...]

Any config key can be overridden on the command line (`--config.model.hidden_size=256`,
`--config.data.source=tfds --config.data.tfds_name=lm1b`, `--config.init_from_hf=PATH`); unknown keys and
invalid values stop the program before any work, naming the key. Running again with the same workdir
resumes from its latest checkpoint. See docs/training.md.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

from hymba_jax.train.config import TrainConfigError

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(_HERE, "configs", "tiny.py"),
                                          "training config file (configs/*.py)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/hymba-tiny", "directory for checkpoints, logs and plots")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from hymba_jax.train.loop import train

    try:
        result = train(_CONFIG.value, _WORKDIR.value)
    except TrainConfigError as e:
        raise SystemExit(f"config error: {e}") from None
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
