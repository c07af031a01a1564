"""Compile the 'pallas_tpu' scan ahead of time for a TPU, on a machine without one.

Needs libtpu matching the installed jax (jax 0.10.2: libtpu 0.0.42.*), kept out of the project's
environment so CPU runs never see it, e.g.:

    pip install --no-deps --target .tpu_site "libtpu==0.0.42.*"
    PYTHONPATH=.tpu_site python benchmarks/scan_tpu_aot.py --topology v5p:2x2x1 [--bundles DIR]

Lowers and compiles the forward and forward+backward of the scan at the benchmark shape (batch 8 x 2048,
d_inner 3200, d_state 16, bf16) for one chip of the topology and prints the compiled memory and cost
analyses. Nothing runs: this checks that Mosaic accepts the kernels.

--bundles DIR also reports the length in VLIW bundles of each Mosaic kernel's code, from libtpu's dump of
its final schedule, per grid step (a chunk of time steps for one block of channels: the chunk loop is
unrolled) and per time step and 128 channels. A TensorCore issues one bundle per cycle and the schedule is
fixed at compile time, so this is the cost to compare kernel designs by without a TPU; it leaves out what
the compiler cannot see (DMA waits, HBM contention). The kernels branch per chunk on whether a document
starts in it; each branch's path is measured by compiling the kernels with that branch only (the code as
shipped holds both). (libtpu's static cycle estimate, --xla_jf_dump_static_llo_profile_to, aborts on these
kernels: libtpu 0.0.42.1 does not model a scalar instruction they use.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from hymba_jax.ops import scan_pallas_tpu
from hymba_jax.ops.scan import selective_scan


def _dump_bundles(directory: Path) -> None:
    """Ask libtpu (read once, when the TPU compiler loads) for the final bundle schedule of everything it
    compiles."""
    directory.mkdir(parents=True, exist_ok=True)
    flags = (f"--xla_jf_dump_to={directory} --xla_jf_dump_llo_text=true "
             "--xla_jf_dump_llo_pass_label_regex=final_bundles")
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") + " " + flags).strip()


def _bundle_report(directory: Path, seen: set, steps: dict[str, int], block: int, blocks: int) -> list[str]:
    """A line per Mosaic kernel among the schedules dumped since `seen` (one compilation): its bundles per
    grid step, per time step and 128 channels, and per time step of all channels. steps: time steps per
    grid step, by the start of the kernel's name; block: channels per grid step; blocks: channel blocks
    (the last one possibly partial)."""
    lines = []
    for path in sorted(directory.glob("*-schedule-analysis_final_bundles.txt")):
        if path in seen:
            continue
        seen.add(path)
        text = path.read_text()
        name = re.sub(r"^\d+-|-\d+-schedule-analysis_final_bundles\.txt$", "", path.name)
        if 'custom_call_target="tpu_custom_call"' not in text or name == "TLP" or name.startswith("<"):
            continue                                    # not a kernel, or the program around the kernels
        bundles = int(re.search(r"total scheduled bundles:\s+(\d+)", text).group(1))
        span = next(count for prefix, count in steps.items() if name.startswith(prefix))
        lines.append(f"  kernel {name}: {bundles} bundles per grid step of {span} time steps, "
                     f"{bundles * 128 / (span * block):.2f} per time step and 128 channels, "
                     f"{bundles * blocks / span:.0f} per time step of all channels")
    return lines


@contextlib.contextmanager
def _one_branch(restarts: bool):
    """Kernels traced with `_per_chunk`'s branch for chunks with (True) or without document starts only."""
    shipped = scan_pallas_tpu._per_chunk
    scan_pallas_tpu._per_chunk = lambda refs, d, q, step: step(
        scan_pallas_tpu._IO(refs, d, q * d["chunk"], restarts))
    jax.clear_caches()                                     # the kernels' traces are cached by shape
    try:
        yield
    finally:
        scan_pallas_tpu._per_chunk = shipped
        jax.clear_caches()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--width", type=int, default=3200)
    parser.add_argument("--state", type=int, default=16)
    parser.add_argument("--bundles", type=Path, default=None,
                        help="dump libtpu's bundle schedules here and report each kernel's length")
    args = parser.parse_args()
    if args.bundles:
        _dump_bundles(args.bundles.resolve())

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
    variants = [("", contextlib.nullcontext())]
    if args.bundles:
        variants += [(", chunks without document starts", _one_branch(False)),
                     (", chunks with document starts", _one_branch(True))]
        cfg = scan_pallas_tpu.kernels().forward.keywords["cfg"]
        sub, lanes, blocks = scan_pallas_tpu._blocks(d, cfg)
        chunk = cfg["chunk"]
        steps = {"selective_scan_forward": chunk * scan_pallas_tpu.forward_group(l // chunk, cfg),
                 "selective_scan_backward": chunk}
    seen: set = set()
    for label, context in variants:
        with context:
            for name, fn in (("forward", forward), ("forward+backward", grad)):
                start = time.perf_counter()
                compiled = jax.jit(fn).lower(*inputs).compile()
                mem = compiled.memory_analysis()
                print(f"{name}{label}: compiled in {time.perf_counter() - start:.1f} s; temp "
                      f"{mem.temp_size_in_bytes / 2**20:.1f} MiB, output {mem.output_size_in_bytes / 2**20:.1f} MiB")
                if args.bundles:
                    print("\n".join(_bundle_report(args.bundles.resolve(), seen, steps, sub * lanes, blocks)),
                          flush=True)


if __name__ == "__main__":
    main()
