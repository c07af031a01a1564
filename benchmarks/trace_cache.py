"""Time the traced-program cache (`compilation_cache.lower_cached`) on the train step: a cold process
(trace, export, store, lower the stored program) against a warm one (load and lower it) and a process
without the cache (trace and lower), each fresh, as train.py meets them. Nothing is compiled unless
--compile.

    PYTHONPATH=. python benchmarks/trace_cache.py --config configs/hymba_1p5b.py --batch-size 8 \
        --scan sequential --attention xla          # on the CPU: what jax lowers there

Prints one JSON line per process: phase, what the cache did, seconds to build the program, to lower
the step through the cache and (with --compile) to compile it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(REPO))
    from hymba_jax.ops.auto import resolve_kernels
    from hymba_jax.parallel import make_mesh
    from hymba_jax.train.config import model_config
    from hymba_jax.train.program import build_train_program
    from hymba_jax.train.step import StepCache, compile_fitting

    spec = importlib.util.spec_from_file_location("config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = args.batch_size
    for field, value in (("scan_backend", args.scan), ("attention_backend", args.attention),
                         ("remat", args.remat)):
        if value:
            config.model[field] = value
    clock = time.perf_counter()
    cfg = resolve_kernels(model_config(config, args.vocab_size))
    mesh = make_mesh(dict(config.mesh), dcn_shape=dict(config.dcn_mesh))
    program = build_train_program(config, cfg, mesh)
    step_args = (program.abstract_state(), program.abstract_batch(config.batch_size, config.seq_len))
    result = {"program_s": round(time.perf_counter() - clock, 2)}
    cache = None if args.phase == "uncached" else StepCache(args.cache_dir, mesh, "train_step",
                                                            program.compile_settings())
    if args.compile:
        clock = time.perf_counter()
        _, _, notes = compile_fitting(program.train_step, cfg, step_args, None, cache)
        result.update(notes=notes, compile_fitting_s=round(time.perf_counter() - clock, 2))
        return result
    from hymba_jax import compilation_cache

    clock = time.perf_counter()
    key = "" if cache is None else compilation_cache.program_key(cache.name, step_args, mesh, cfg, cache.settings)
    result["key_s"] = round(time.perf_counter() - clock, 2)
    clock = time.perf_counter()
    _, how = compilation_cache.lower_cached(program.train_step(cfg), step_args, mesh=mesh, key=key,
                                            directory=None if cache is None else cache.directory)
    result.update(how=how, lower_s=round(time.perf_counter() - clock, 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hymba_1p5b.py"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=32001)
    parser.add_argument("--scan", default="", help="model.scan_backend (default: the config's, auto)")
    parser.add_argument("--attention", default="", help="model.attention_backend (default: the config's)")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--compile", action="store_true", help="compile too (compile_fitting)")
    parser.add_argument("--cache-dir", default="", help="internal: the phase's cache directory")
    parser.add_argument("--phase", default="", help="internal: cold, warm or uncached")
    args = parser.parse_args()
    if args.phase:
        print(json.dumps({"phase": args.phase, **measure(args)}), flush=True)
        return
    cache_dir = tempfile.mkdtemp(prefix="trace_cache_")
    for phase in ("cold", "warm", "uncached"):
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--cache-dir", cache_dir],
                       check=False, timeout=900)


if __name__ == "__main__":
    main()
