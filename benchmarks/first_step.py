"""Time `python train.py` as a user meets it: from launch to the first completed step, then steady tokens/s.

    PYTHONPATH=. python benchmarks/first_step.py --name cold --steps 25 --timeout 200 -- \
        --config configs/hymba_1p5b.py --config.batch_size=8 --config.model.vocab_size=32001 \
        --config.checkpoint_every=100000 --config.eval_every=0 --config.compilation_cache_dir=/tmp/jax_cache

Everything after `--` goes to train.py (with a fresh `--workdir` per run). The program is stopped once
`--steps` steps are logged (or at `--timeout`), so no checkpoint or final evaluation is timed. Run it twice
with the same `compilation_cache_dir` for the cold and the warm start. First step: the time of the first
`train` record in metrics.jsonl (train.py always logs a run's first step) minus the launch time; tokens/s:
the median over the records after step 5 (each the mean since the record before, so with the default
log_every no per-step host sync is timed). The result is printed as one JSON line (and appended to --json) with the run
record train.py wrote (platform and kernels). train.py's own log goes to <name>.log beside --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", default="run")
    parser.add_argument("--steps", type=int, default=20, help="stop once this many steps are logged")
    parser.add_argument("--timeout", type=float, default=600.0, help="stop after this many seconds anyway")
    parser.add_argument("--json", default=None, help="append the result here")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's arguments")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    workdir = Path(tempfile.mkdtemp(prefix=f"first_step_{args.name}_"))
    log_dir = Path(args.json).parent if args.json else workdir
    log_dir.mkdir(parents=True, exist_ok=True)
    metrics = workdir / "metrics.jsonl"

    start = time.time()
    with open(log_dir / f"{args.name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-u", str(REPO / "train.py"), "--workdir", str(workdir),
                                 *train_args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        records: list[dict] = []
        while time.time() - start < args.timeout and proc.poll() is None:
            time.sleep(0.5)
            if metrics.exists():
                records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                steps = [r["step"] for r in records if r["kind"] == "train"]
                if steps and steps[-1] >= args.steps:
                    break
        proc.kill()
        proc.wait()

    train = [r for r in records if r["kind"] == "train"]
    result = {"name": args.name, "train_args": train_args, "elapsed_s": time.time() - start,
              "exit_code": proc.returncode, "run": [r for r in records if r["kind"] == "run"]}
    if train:
        steady = [r for r in train if r["step"] > 5]
        result.update(first_step_s=train[0]["time"] - start, last_step=train[-1]["step"],
                      loss=train[-1]["loss"])
        if steady:
            result["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in steady)
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
