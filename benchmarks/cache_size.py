"""Generation-cache size of Hymba-1.5B against the Llama-3.2-3B shape, 1k to 32k tokens (no device needed).

    python benchmarks/cache_size.py [--dtype bfloat16] [--batch 1]

MB is bytes / 1.024e6, the paper's unit (its table: 79 MB against 918 MB at 8k). The parts: K/V of the text
positions (ring buffers of the window for sliding-window layers, every position for global ones, plus the
one pending position), the meta tokens' K/V (stored per sequence), the conv inputs, the fp32 SSM state.
"""

from __future__ import annotations

import argparse

from hymba_jax.config import hymba_1p5b, llama_3p2_3b_shape
from hymba_jax.infer.cache import cache_size

MB = 1.024e6
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", help="K/V and conv dtype (the SSM state is fp32)")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    hymba, llama = hymba_1p5b(dtype=args.dtype), llama_3p2_3b_shape(dtype=args.dtype)
    print(f"cache MB (bytes / 1.024e6), {args.dtype}, batch {args.batch}")
    print("| tokens | Hymba-1.5B total | K/V | meta K/V | conv | SSM | Llama-3.2-3B shape | Llama / Hymba |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for length in LENGTHS:
        h, l = cache_size(hymba, length, args.batch), cache_size(llama, length, args.batch)
        print(f"| {length} | {h.total / MB:.1f} | {h.kv / MB:.1f} | {h.meta_kv / MB:.1f} | {h.conv / MB:.2f} | "
              f"{h.ssm / MB:.2f} | {l.total / MB:.1f} | {l.total / h.total:.1f}x |")


if __name__ == "__main__":
    main()
