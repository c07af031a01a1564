"""train.py keeps its compiled programs in `compilation_cache_dir` and a second run of the same config
loads them instead of compiling, and its traced train step instead of tracing (checked on the cache
directory's entries and the run's log, not on timings)."""

from __future__ import annotations

import json
import subprocess
import sys

from train_testing import REPO, config_file, small_run, subprocess_env


def test_second_run_reuses_the_compilation_cache(tmp_path):
    cache = tmp_path / "xla_cache"
    config = config_file(tmp_path, {**small_run(tmp_path, num_steps=2), "optimizer.warmup_steps": 1,
                                    "compilation_cache_dir": str(cache)})
    env = subprocess_env(tmp_path)                # every compilation is stored (min time 0)
    env.pop("JAX_COMPILATION_CACHE_DIR")          # the config key, not JAX's variable, names the directory

    def run(workdir: str) -> tuple[dict[str, float], str]:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config), "--workdir",
                               str(tmp_path / workdir)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run_record = json.loads((tmp_path / workdir / "metrics.jsonl").read_text().splitlines()[0])
        assert run_record["kind"] == "run" and run_record["compilation_cache"] == str(cache)
        return {p.relative_to(cache): p.stat().st_mtime for p in cache.rglob("*")}, proc.stdout

    first, log = run("first")
    assert any(p.name.startswith("jit_step") for p in first), sorted(first)   # the train step is stored
    assert len([p for p in first if p.parent.name == "traced"]) == 1 and "traced and stored" in log
    second, log = run("second")                   # another workdir: a fresh start, the same programs
    assert second == first                        # every program came from the cache; nothing was rewritten
    assert "loaded the traced program" in log
