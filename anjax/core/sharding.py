"""All partitioning in one place: the (data, fsdp, tensor) mesh and one table of logical-axis rules.

Parameters and activations carry logical axis names (`anjax.core.model`); `RULES` maps
them to mesh axes. Flax applies the rules in order and skips a rule whose mesh
axis is already taken by an earlier dimension, so an activation
(batch, length, embed) gets batch -> (data, fsdp) and leaves embed unsharded,
while a parameter (vocab, embed) gets vocab -> tensor, embed -> fsdp (ZeRO-3 /
FSDP: every parameter, gradient and optimizer moment is split over fsdp).
A dimension that a mesh axis does not divide evenly (e.g. a vocabulary of
49153 after adding `<AC>`) stays replicated along that axis.
"""

from __future__ import annotations

import contextlib
import math
import os

import flax.linen as nn
import jax
import numpy as np
from flax.linen.spmd import logical_to_mesh, logical_to_mesh_axes
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


def init_distributed(requested: bool = False) -> None:
    """jax.distributed.initialize() when `requested` (a run config's run.distributed) or JAX_COORDINATOR_ADDRESS
    is in the environment (once per process): train.py, infer.py and `python -m anjax.evaluate` join a
    multi-process run this one way. The process count and index come from JAX_NUM_PROCESSES / JAX_PROCESS_ID when
    set; otherwise JAX detects them (TPU pods, SLURM, Open MPI, Kubernetes)."""
    env = os.environ
    if (requested or env.get("JAX_COORDINATOR_ADDRESS")) and not jax.distributed.is_initialized():
        num, index = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        jax.distributed.initialize(num_processes=int(num) if num else None, process_id=int(index) if index else None)


def make_mesh(data: int, fsdp: int, tensor: int, devices=None) -> jax.sharding.Mesh:
    """The global mesh over `devices` (default: all); one axis may be -1: it takes every device the other two leave."""
    n, sizes = (jax.device_count() if devices is None else len(devices)), [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, got {sizes}")
    if -1 in sizes:
        known = -math.prod(sizes)
        if n % known:
            raise ValueError(f"the mesh axes given ({sizes}) do not divide the {n} devices")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh data x fsdp x tensor = {sizes}, {math.prod(sizes)} devices, but there are {n} "
            "(set one axis to -1 to use all of them)"
        )
    axis_types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=axis_types, devices=devices)
    except AssertionError:  # compile-only TPU v4 devices are single cores, which jax's physical layout rejects
        return jax.sharding.Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=axis_types)


def check_batch(mesh: jax.sharding.Mesh, batch_size: int, grad_accum: int) -> None:
    """Each micro-batch (batch_size / grad_accum rows) must split over the data x fsdp devices."""
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % grad_accum or (batch_size // grad_accum) % rows:
        raise ValueError(
            f"data.batch_size={batch_size} must split into train.grad_accum={grad_accum} micro-batches "
            f"that each split over mesh data x fsdp = {rows} devices"
        )


@contextlib.contextmanager
def active(mesh: jax.sharding.Mesh):
    """Mesh and logical-axis rules in force while jitted steps trace (for nn.with_logical_constraint)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield


def _divisible(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """`spec` with the mesh axes that do not divide their dimension dropped."""

    def fits(axes, dim):
        names = axes if isinstance(axes, tuple) else (axes,)
        return axes is None or dim % math.prod(mesh.shape[a] for a in names) == 0

    return P(*(axes if fits(axes, dim) else None for axes, dim in zip(spec, shape)))


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh) -> P:
    """The PartitionSpec of an array [shape] with logical `axes` under `RULES` (on a Mesh or an AbstractMesh),
    without the mesh axes that do not divide their dimension."""
    spec = logical_to_mesh_axes(axes, RULES)
    assert spec is not None  # None only for axes None
    return _divisible(spec, shape, mesh)


def logical_shardings(boxed_abstract, mesh: jax.sharding.Mesh):
    """NamedShardings of a tree of `nn.LogicallyPartitioned` ShapeDtypeStructs (from jax.eval_shape(init))."""
    specs = logical_to_mesh(nn.get_partition_spec(boxed_abstract), RULES)
    shapes = nn.meta.unbox(boxed_abstract)
    return jax.tree.map(
        lambda s, x: NamedSharding(mesh, _divisible(s, x.shape, mesh)),
        specs,
        shapes,
        is_leaf=lambda s: isinstance(s, P),
    )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """[B, L] arrays: rows split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(tree, shardings):
    """Place host (numpy) arrays, identical on every process, onto the mesh; works multi-host."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]), tree, shardings
    )


def _row_blocks(mesh: jax.sharding.Mesh) -> np.ndarray:
    """Ascending indices of the data x fsdp row blocks that this process's devices hold."""
    blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    sharding = batch_sharding(mesh)
    indices = sharding.devices_indices_map((blocks,))
    return np.asarray(sorted({indices[d][0].start or 0 for d in sharding.addressable_devices}), np.int64)


def process_row_indices(mesh: jax.sharding.Mesh, global_rows: int) -> np.ndarray:
    """[R] ascending global row indices of a [global_rows, ...] batch that this process's devices hold.

    Read off the batch sharding, not the process index: devices that are replicas along `tensor` hold
    the same rows, so processes that share a row block read the same rows (with mesh.tensor spanning
    all processes, every process reads the whole batch).
    """
    block = global_rows // (mesh.shape["data"] * mesh.shape["fsdp"])
    return (_row_blocks(mesh)[:, None] * block + np.arange(block)).reshape(-1)


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's rows [R, L] -- global rows `process_row_indices(mesh, B)`, in that order -- -> the
    global sharded batch [B, L]. With one process R = B."""
    sharding = batch_sharding(mesh)
    local_rows = next(iter(batch.values())).shape[0]
    global_rows = local_rows * mesh.shape["data"] * mesh.shape["fsdp"] // len(_row_blocks(mesh))
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:])) for k, v in batch.items()
    }
