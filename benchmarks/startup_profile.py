"""Where train.py's start-up goes: the launch-to-first-step of a run traced with jax.profiler, the host's
events (JAX's tracing and lowering, XLA's passes, autotuning, LLVM, ptxas, the Triton kernels) summed by name.

    PYTHONPATH=. python benchmarks/startup_profile.py --out /tmp/startup -- --config configs/hymba_1p5b.py \
        --workdir /tmp/w --config.batch_size=8 --config.compilation_cache_dir=/tmp/empty_cache

Everything after `--` is train.py's command line. The trace starts before train() and stops once the first
step is logged; the xplane file stays under --out, the summary is printed and written to
<out>/summary.txt: the wall time of the biggest events of each thread as a tree (nested events inside
their parents), and every event name's total and self time (without the events nested in it) over all
threads. Compile threads run in parallel, so totals over threads can exceed the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def summarise(data, tree_min_s: float = 0.5, top: int = 60) -> str:
    """The text summary (see the module docstring) of a trace read by jax's ProfileData (e.g.
    `ProfileData.from_file(path to an .xplane.pb)`)."""
    total = collections.Counter()
    own = collections.Counter()
    count = collections.Counter()
    lines_out = []
    for plane in data.planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            events = sorted(((e.start_ns, e.end_ns, e.name) for e in line.events), key=lambda e: (e[0], -e[1]))
            if not events:
                continue
            busy = 0
            stack: list[list] = []            # [start, end, name, time in children]
            tree = []

            def close(entry):
                start, end, name, children = entry
                own[name] += end - start - children
                if stack:
                    stack[-1][3] += end - start
                else:
                    nonlocal busy
                    busy += end - start

            for start, end, name in events:
                while stack and stack[-1][1] <= start:
                    close(stack.pop())
                total[name] += end - start
                count[name] += 1
                if (end - start) / 1e9 >= tree_min_s:
                    tree.append(f"{'  ' * len(stack)}{(end - start) / 1e9:8.2f} s  {name[:110]}")
                stack.append([start, end, name, 0])
            while stack:
                close(stack.pop())
            if busy / 1e9 >= tree_min_s:
                lines_out.append(f"\n== thread {line.name}: busy {busy / 1e9:.2f} s")
                lines_out.extend(tree)
    lines_out.append(f"\n== top {top} event names by total time (all threads)")
    for name, ns in total.most_common(top):
        lines_out.append(f"{ns / 1e9:9.2f} s  x{count[name]:<6d} {name[:110]}")
    lines_out.append(f"\n== top {top} event names by self time (all threads)")
    for name, ns in own.most_common(top):
        lines_out.append(f"{ns / 1e9:9.2f} s  x{count[name]:<6d} {name[:110]}")
    return "\n".join(lines_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for the trace and summary.txt")
    parser.add_argument("--tree_min_s", type=float, default=0.5, help="show events at least this long in the trees")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then train.py's arguments")
    args = parser.parse_args()
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    launch = time.time()

    import jax
    from absl import flags
    from jax._src.lib import _profile_data

    sys.path.insert(0, str(REPO))
    import train as train_script
    from hymba_jax.train import loop

    class FirstStep(Exception):
        """Raised once the first step's record is written: the run stops there."""

    write = loop.MetricsLogger.write

    def write_then_stop(self, kind: str, step: int, values: dict) -> None:
        write(self, kind, step, values)
        if kind == "train":
            raise FirstStep()

    loop.MetricsLogger.write = write_then_stop
    flags.FLAGS(["train.py", *train_args])
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0           # XLA's and JAX's C++ events only: Python's would slow the run
    jax.profiler.start_trace(str(out), profiler_options=options)
    try:
        train_script.main()
    except FirstStep:
        pass
    finally:
        jax.profiler.stop_trace()
    first_step = time.time() - launch
    xplanes = sorted(glob.glob(os.path.join(out, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    text = f"launch to first step (inside the profiler): {first_step:.1f} s\n" + summarise(
        _profile_data.ProfileData.from_file(xplanes[-1]), args.tree_min_s)
    (out / "summary.txt").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
