"""Kernels behind the model: the selective scan (one interface, backends by name) and fused attention.

Importing this package registers every scan backend, so `HymbaConfig.scan_backend` names resolve. The
Pallas backends import only portable JAX modules here; their kernels compile when first called on a GPU
(Triton) or TPU (Mosaic).
"""

from hymba_jax.ops import scan, scan_chunked, scan_pallas_gpu, scan_pallas_tpu  # noqa: F401  (registers)
