"""Random initialisation of a preset: `init_params` (layer by layer) against one `jax.jit(model.init)` of
the whole model, wall time of compile + run on the default device, for each key implementation.

    PYTHONPATH=. python benchmarks/init.py --preset hymba_1p5b
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from hymba_jax.config import get_preset
from hymba_jax.model.lm import HymbaForCausalLM, init_params


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="hymba_1p5b")
    parser.add_argument("--keys", nargs="+", default=["threefry2x32", "unsafe_rbg"])
    parser.add_argument("--skip_whole_model", action="store_true")
    args = parser.parse_args()
    cfg = get_preset(args.preset, dtype="bfloat16")
    model = HymbaForCausalLM(cfg)
    whole = lambda key: nn.meta.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    print(f"{args.preset} on {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for impl in args.keys:
        key = jax.random.key(0, impl=impl)
        ways = [("layer by layer (init_params)", lambda: init_params(cfg, key))]
        if not args.skip_whole_model:
            ways.append(("whole model, one jit(model.init)", lambda: jax.jit(whole)(key)))
        for label, make in ways:
            jax.clear_caches()
            start = time.perf_counter()
            jax.block_until_ready(make())
            print(f"  {impl:13s} {label:34s} {time.perf_counter() - start:7.1f} s", flush=True)


if __name__ == "__main__":
    main()
