"""The one command-line convention of the programs (train.py, eval.py, generate.py, `python -m hymba_jax.aot`):
absl flags, the settings in one ml_collections `--config` whose every key can be set as
`--config.key=value`, and `--workdir DIR` for a training workdir, as in the Flax examples and MaxText.

    CONFIG = cli.define_config(default_settings(), "evaluation settings")   # or a configs/*.py path
    WORKDIR = cli.define_workdir("training workdir to evaluate")

    def main() -> None:
        config = cli.settings(CONFIG, WORKDIR)   # --workdir folded into config.workdir
        source = cli.model_source(config)        # config.workdir or config.hf_checkpoint
        ...

    if __name__ == "__main__":
        cli.run(main)

Benchmarks are scripts with argparse options of their own; they are not programs in this sense.
"""

from __future__ import annotations

import difflib
import sys
from typing import Callable, Optional, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_KNOWN: tuple[Optional[ml_collections.ConfigDict], str] = (None, "")   # define_config's keys, for `run`


def define_config(default: Optional[str] | ml_collections.ConfigDict, help_string: str,
                  known: Optional[ml_collections.ConfigDict] = None, where: str = "") -> flags.FlagHolder:
    """Defines `--config`: a config file (a path default, e.g. configs/tiny.py) or the program's settings
    (a ConfigDict default), with every key settable as `--config.key=value`.

    An override naming no key stops the program with that key and the closest keys of `known` (default:
    the ConfigDict given), naming `where` the keys are defined, instead of config_flags' traceback: here
    when config_flags applies the overrides while defining the flag (a default config), else when `run`
    parses the flags (a config file given on the command line).
    """
    global _KNOWN
    if known is None and isinstance(default, ml_collections.ConfigDict):
        known = default
    _KNOWN = (known, where)
    try:
        if isinstance(default, ml_collections.ConfigDict):
            return config_flags.DEFINE_config_dict("config", default, help_string, lock_config=True)
        return config_flags.DEFINE_config_file("config", default, help_string, lock_config=True)
    except (KeyError, AttributeError):
        raise SystemExit(f"config error: {unknown_override(sys.argv, known, where)}") from None


def define_workdir(help_string: str, default: Optional[str] = None) -> flags.FlagHolder:
    """Defines `--workdir DIR`, train.py's flag (every program that reads a training workdir takes it)."""
    return flags.DEFINE_string("workdir", default, help_string)


def settings(config: flags.FlagHolder, workdir: flags.FlagHolder) -> ml_collections.ConfigDict:
    """The --config settings with `--workdir DIR` written into `config.workdir`: one setting, two spellings
    (`--workdir DIR` as in train.py, `--config.workdir=DIR`), which may not disagree."""
    values = config.value
    if workdir.value is not None:
        if values.workdir and values.workdir != workdir.value:
            raise SystemExit(f"config error: --workdir={workdir.value} and --config.workdir={values.workdir} "
                             "disagree; give one of them")
        values.workdir = workdir.value
    return values


def model_source(config: ml_collections.ConfigDict) -> str:
    """The model a program reads (as `hymba_jax.loading` takes it): `config.workdir` (a training workdir,
    --workdir) or `config.hf_checkpoint` (a Hugging Face checkpoint directory); exactly one of them."""
    if bool(config.workdir) == bool(config.hf_checkpoint):
        raise SystemExit("config error: give exactly one of --workdir (or --config.workdir) and "
                         "--config.hf_checkpoint")
    return config.workdir or config.hf_checkpoint


def run(main: Callable[[], None]) -> None:
    """absl's app.run of `main()`: positional arguments are refused, and absl's log shows warnings and
    errors only unless --verbosity is given (Orbax logs every checkpoint read or written at INFO)."""
    def program(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {list(argv[1:])}")
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)
        main()

    def parse(argv: list[str]) -> list[str]:
        try:
            return app.parse_flags_with_usage(argv)
        except (KeyError, AttributeError):   # a --config.<key> override of a config file that has no such key
            raise SystemExit(f"config error: {unknown_override(argv, *_KNOWN)}") from None

    app.run(program, flags_parser=parse)


def unknown_override(argv: Sequence[str], known: Optional[ml_collections.ConfigDict], where: str = "") -> str:
    """The message for a `--config.<key>=` override in `argv` that names no key of `known`: the key and the
    closest keys."""
    keys = _dotted_keys(known) if known is not None else []
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=")[0]
            if key not in keys:
                leaf = key.split(".")[-1]
                leaves = difflib.get_close_matches(leaf, [k.split(".")[-1] for k in keys], cutoff=0.8)
                close = (difflib.get_close_matches(key, keys, n=3, cutoff=0.8)
                         or [k for k in keys if k.split(".")[-1] in leaves])
                hint = f"; did you mean {' or '.join(f'--config.{k}' for k in close[:3])}?" if close else ""
                return f"--config.{key}: no such config key{hint}" + (f" (every key: {where})" if where else "")
    return "a --config override cannot be applied (run with --helpfull to see the keys)"


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _dotted_keys(value, f"{prefix}{key}.")
    return keys
