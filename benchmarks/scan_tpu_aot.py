"""Compile the 'pallas_tpu' scan ahead of time for a TPU, on a machine without one.

Needs libtpu matching the installed jax (jax 0.10.2: libtpu 0.0.42.*), kept out of the project's
environment so CPU runs never see it, e.g.:

    pip install --no-deps --target .tpu_site "libtpu==0.0.42.*"
    PYTHONPATH=.tpu_site python benchmarks/scan_tpu_aot.py --topology v5p:2x2x1

Lowers and compiles the forward and forward+backward of the scan at the benchmark shape (batch 8 x 2048,
d_inner 3200, d_state 16, bf16) for one chip of the topology and prints the compiled memory and cost
analyses. Nothing runs: this checks that Mosaic accepts the kernels.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from hymba_jax.ops.scan import selective_scan


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--width", type=int, default=3200)
    parser.add_argument("--state", type=int, default=16)
    args = parser.parse_args()

    topo = topologies.get_topology_desc(platform="tpu", topology_name=args.topology)
    device = topo.devices[0]
    print(f"topology {args.topology}: {len(topo.devices)} devices, compiling for {device.device_kind}")
    sharding = jax.sharding.SingleDeviceSharding(device)
    b, l, d, n = args.batch, args.length, args.width, args.state
    spec = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    inputs = (spec((b, l, d)), spec((b, l, d)), spec((d, n), jnp.float32), spec((b, l, n)), spec((b, l, n)),
              spec((d,), jnp.float32), spec((b, l, d)), spec((d,), jnp.float32), spec((b, l), jnp.bool_),
              spec((1, d, n), jnp.float32))

    def forward(x, dt, A, B, C, D, z, bias, reset, h0):
        return selective_scan(x, dt, A, B, C, D, z, bias, reset=reset, initial_state=h0, backend="pallas_tpu")

    def loss(*args):
        y, last = forward(*args)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(last)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6, 7, 9))
    for name, fn in (("forward", forward), ("forward+backward", grad)):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*inputs).compile()
        mem = compiled.memory_analysis()
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s; temp "
              f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, output {mem.output_size_in_bytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
