"""Device mesh, logical-axis rules and sharded arrays: the one place that maps the model onto devices.

Every parameter of the model carries logical axis names ('embed', 'heads', 'inner', 'mlp', ...). A rules
table maps each logical name to mesh axes; the mesh has three axes:

* `data`: pure data parallelism (parameters replicated),
* `fsdp`: data parallelism with parameters and optimizer state sharded along 'embed' (ZeRO-3 style),
* `tensor`: attention heads, SSM channels ('inner') and MLP columns split across devices.

The batch is split over (data, fsdp). The API:

    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})        # -1 takes the remaining devices
    mesh = make_mesh({"fsdp": -1}, dcn_shape={"data": -1})          # multi-slice: ICI shape x DCN shape
    shardings = logical_shardings(abstract_boxed_tree, mesh, rules)  # nn.Partitioned -> NamedSharding
    sharding = batch_sharding(mesh, rules)                           # for (batch, length) arrays
    batch = shard_batch(host_batch, sharding)                        # process-local numpy -> global
    with sharding_context(mesh, rules): ...                          # activation constraints apply
    collective_operands(compiled.as_text())                          # what a compiled step communicates

The same code runs on one CPU, on simulated CPU devices and on many hosts: every host passes only its
own rows to `shard_batch`, and nothing copies full parameters through a host.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Any, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical axis, mesh axes). Logical names not listed are replicated.
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("inner", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),
    ("length", None),
)

AxisRules = Sequence[tuple[str, Any]]

# Collective ops as XLA names them in the compiled module (see `collective_operands` for the TPU's form of
# a reduce-scatter).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class MeshError(ValueError):
    """A mesh or rules table that cannot be built on the available devices (names the axis)."""


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int, key: str = "mesh") -> dict[str, int]:
    """Mesh axis sizes with the single -1 replaced by whatever devices remain (`key` names the config
    group in errors)."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"{key}.{unknown[0]}: unknown mesh axis; the axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshError(f"{key}.{axis}={size}: must be a positive size or -1 (the remaining devices)")
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MeshError(f"{key}.{fill[1]}=-1: only one mesh axis may be -1 (also {fill[0]})")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise MeshError(f"{key}.{fill[0]}=-1: {num_devices} devices are not divisible by the other axes' "
                            f"product {fixed}")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"{key} {sizes} needs {math.prod(sizes.values())} devices but {num_devices} are "
                        "available; set one axis to -1 to take the rest")
    return sizes


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_shape: Optional[Mapping[str, int]] = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    `shape` is the mesh inside one slice (ICI: the devices joined by the fast interconnect). `dcn_shape`
    (default all 1) is the mesh across slices (DCN); the mesh axis sizes are the products. A slice is a
    TPU slice on TPUs (`device.slice_index`), otherwise a process (e.g. a GPU node). Put only `data` (or
    `fsdp`) across DCN: they communicate once per step, `tensor` every layer.
    """
    devices = jax.devices() if devices is None else list(devices)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if not dcn_shape or all(int(v) == 1 for v in dcn_shape.values()):
        sizes = resolve_mesh_shape(shape, len(devices))
        return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=auto, devices=devices)
    by_slice = devices[0].platform == "tpu"
    granules = len({(getattr(d, "slice_index", 0) if by_slice else d.process_index) for d in devices})
    dcn = resolve_mesh_shape(dcn_shape, granules, "dcn_mesh")
    ici = resolve_mesh_shape(shape, len(devices) // granules)
    array = mesh_utils.create_hybrid_device_mesh([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES],
                                                 devices, process_is_granule=not by_slice)
    return Mesh(array, MESH_AXES, axis_types=auto)


def check_rules(rules: AxisRules) -> None:
    """Raises MeshError when a rule names a mesh axis that does not exist."""
    for logical, mesh_axes in rules:
        targets = mesh_axes if isinstance(mesh_axes, (tuple, list)) else (mesh_axes,)
        for axis in targets:
            if axis is not None and axis not in MESH_AXES:
                raise MeshError(f"axis_rules: logical axis {logical!r} maps to {axis!r}, which is not a mesh "
                                f"axis {MESH_AXES}")


def logical_shardings(tree: Any, mesh: Mesh, rules: AxisRules) -> Any:
    """NamedShardings for a tree whose leaves are nn.Partitioned boxes (or ShapeDtypeStructs inside them),
    e.g. `jax.eval_shape(model.init, ...)`. Unboxed leaves are replicated."""
    specs = nn.get_partition_spec(tree)
    return nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])


def batch_sharding(mesh: Mesh, rules: AxisRules) -> NamedSharding:
    """The sharding of (batch, length) arrays: rows split over the axes the 'batch' rule names."""
    return nn.logical_to_mesh_sharding(PartitionSpec("batch", "length"), mesh, [tuple(r) for r in rules])


def spec_axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry (None, an axis name or a tuple of names), as a tuple."""
    return entry if isinstance(entry, tuple) else (() if entry is None else (entry,))


def kernel_mesh_axes(logical: str, sizes: Sequence[int], mesh: Any) -> Any:
    """The mesh axes the active sharding rules give the `logical` axis, for the shard_map around a kernel
    (a custom call XLA cannot split); None when they name none or do not divide every one of `sizes`, so
    the kernel sees that axis whole."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    names = spec_axes(axes)
    ways = math.prod(mesh.shape[a] for a in names)
    return axes if names and all(size % ways == 0 for size in sizes) else None


def check_divisible(shapes: Any, shardings: Any) -> None:
    """Raises MeshError naming the first array whose sharded dimension does not split evenly.

    shapes: a tree of arrays / ShapeDtypeStructs; shardings: the matching tree of NamedShardings.
    """
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(shardings)):
        for dim, (size, axes) in enumerate(zip(shape.shape, sharding.spec)):
            axes = spec_axes(axes)
            ways = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % ways:
                raise MeshError(
                    f"{jax.tree_util.keystr(path)}: dimension {dim} of shape {tuple(shape.shape)} does not split "
                    f"{ways} ways over mesh axes {axes}; change the mesh sizes or map its logical axis to None "
                    "in axis_rules")


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: AxisRules) -> Iterator[None]:
    """Inside it (also while tracing under jit) the model's `nn.with_logical_constraint` calls on
    activations become sharding constraints on `mesh`; outside they are no-ops."""
    with nn.logical_axis_rules([tuple(r) for r in rules]), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        yield


def data_parallel_size(mesh: Mesh, rules: AxisRules) -> int:
    """How many ways the batch is split (the global batch must be a multiple of it)."""
    return math.prod(mesh.shape[a] for a in spec_axes(batch_sharding(mesh, rules).spec[0]))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays (rows of all processes, in process order)."""
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def collective_operands(hlo: str) -> dict[str, list[str]]:
    """The operand shapes of every collective in a compiled HLO module, by op ('f32[8,32,32]', ...).

    Counting operands, not ops, keeps the numbers independent of XLA combining several collectives into
    one tuple-shaped op. The TPU compiler writes a reduce-scatter as a fusion that calls a computation
    named `all-reduce-scatter*` (an all-reduce and the dynamic-slice of this chip's part, which the chip
    runs as one reduce-scatter): such a fusion counts as a reduce-scatter of its result's shape, and the
    all-reduce inside it not at all."""
    out: dict[str, list[str]] = {op: [] for op in COLLECTIVES}
    shapes = lambda result: re.findall(r"\w+\[[\d,]*\]", result)
    result = r"(\((?:[^()]|\([^()]*\))*\)|\S+)"    # one shape, or a tuple of them (layouts hold parentheses)
    computation = ""
    for line in hlo.splitlines():
        if header := re.match(r"(?:ENTRY )?%?([\w.-]+) \(", line):
            computation = header.group(1)
        if fused := re.search(rf"= {result} fusion\(.*calls=%all-reduce-scatter", line):
            out["reduce-scatter"] += shapes(fused.group(1))
        elif not computation.startswith("all-reduce-scatter"):
            for op in COLLECTIVES:
                if found := re.search(rf"= {result} {op}(?:-start)?\(", line):
                    out[op] += shapes(found.group(1))
    return out
