"""The programs' one command-line convention (hymba_jax/cli.py): unknown --config keys named with the closest
ones, and the model a program reads given as exactly one of --workdir and --config.hf_checkpoint."""

from __future__ import annotations

import ml_collections
import pytest

from hymba_jax import cli


def test_unknown_override_names_the_closest_keys():
    known = ml_collections.ConfigDict(dict(max_new_tokens=1, optimizer=dict(warmup_steps=1)))
    message = cli.unknown_override(["prog", "--config.max_new_token=3"], known, "generate.py:generate_config")
    assert message == ("--config.max_new_token: no such config key; did you mean --config.max_new_tokens? "
                       "(every key: generate.py:generate_config)")
    assert "--config.optimizer.warmup_steps?" in cli.unknown_override(["--config.warmup_step=1"], known)
    assert "cannot be applied" in cli.unknown_override(["--config.optimizer.warmup_steps=x"], known)


@pytest.mark.parametrize("workdir, hf, ok", [("w", "", True), ("", "h", True), ("", "", False), ("w", "h", False)])
def test_model_source_is_exactly_one_of_workdir_and_hf_checkpoint(workdir, hf, ok):
    config = ml_collections.ConfigDict(dict(workdir=workdir, hf_checkpoint=hf))
    if ok:
        assert cli.model_source(config) == workdir + hf
    else:
        with pytest.raises(SystemExit, match="exactly one of --workdir"):
            cli.model_source(config)
