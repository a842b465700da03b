"""Where inference arrays live: one device, or a (data, tensor) mesh under the training rules.

`--mesh data=D,tensor=T` is `anjax.core.sharding.make_mesh(D, 1, T)` over the first D x T devices, and the one
rules table (`anjax.core.sharding.RULES`) places everything: the weights by their logical axes (heads,
kv_heads, mlp, vocab -> tensor: Megatron-style tensor parallelism, each device holds 1/T of every layer), a
`GenState` by `state_axes` (rows -> data, KV heads -> tensor). Inside the jitted steps `constrain_state` keeps
the state there and the model's activation constraints apply (`Runtime` traces under the mesh), so compaction
and sampling (per row) run where their rows live, shapes stay fixed and no step adds a host round trip.
Without a mesh (None) everything stays on the default device, as before.
"""

from __future__ import annotations

from typing import TypeGuard

import jax
import numpy as np
from jax.sharding import NamedSharding

from anjax.core import sharding
from anjax.core.config import ModelConfig
from anjax.core.model import init_boxed
from anjax.core.params import Params

KV_AXES = ("layers", "batch", "kv_heads", "length", "head_dim")  # keys/values [L, B, K, C, D]


def check_tensor(cfg: ModelConfig, tensor: int) -> None:
    """ValueError unless `tensor` divides the query and the KV heads (each device holds whole heads)."""
    if cfg.num_heads % tensor or cfg.num_kv_heads % tensor:
        raise ValueError(
            f"--mesh tensor={tensor} must divide the model's {cfg.num_heads} heads and {cfg.num_kv_heads} KV heads"
        )


def inference_mesh(cfg: ModelConfig, data: int = 1, tensor: int = 1) -> jax.sharding.Mesh | None:
    """The (data, fsdp=1, tensor) mesh over the first data x tensor devices; None for one device."""
    if data < 1 or tensor < 1:
        raise ValueError(f"--mesh data and tensor must be >= 1, got data={data}, tensor={tensor}")
    check_tensor(cfg, tensor)
    n, devices = data * tensor, jax.devices()
    if n > len(devices):
        raise ValueError(f"--mesh data={data},tensor={tensor} needs {n} devices, there are {len(devices)}")
    if jax.process_count() > 1 and n != len(devices):  # each process must hold part of the mesh to run its steps
        raise ValueError(
            f"--mesh data={data},tensor={tensor} covers {n} devices; a run of {jax.process_count()} processes "
            f"needs a mesh over all {len(devices)}"
        )
    return None if n == 1 else sharding.make_mesh(data, 1, tensor, devices[:n])


def rows(mesh: jax.sharding.Mesh | None) -> int:
    """The devices a batch's rows split over (a batch is padded to a multiple of it)."""
    return 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]


def place_params(cfg: ModelConfig, params: Params, mesh: jax.sharding.Mesh | None) -> Params:
    """The parameter tree on the device, or split over `mesh` by the logical axes `cfg`'s model gives it."""
    if mesh is None:
        return jax.device_put(params)
    check_tensor(cfg, mesh.shape["tensor"])
    boxed = jax.eval_shape(lambda: init_boxed(cfg, jax.random.key(0)))
    return sharding.put(params, sharding.logical_shardings(boxed, mesh))


def state_axes(state):
    """The logical axes of every leaf of a `GenState`: keys/values (stacked [L, B, K, C, D] or per layer
    [B, K, C, D]) and the policies' `mass` [L, B, K, C] over rows and KV heads, slot metadata [B, C] and every
    per-row field [B, ...] over rows."""

    def axes(path, x):
        names = [getattr(k, "name", None) for k in path]
        if "keys" in names or "values" in names:
            return KV_AXES[5 - x.ndim :]
        if "mass" in names:
            return KV_AXES[:4]
        return ("batch",) + (None,) * (x.ndim - 1)

    return jax.tree_util.tree_map_with_path(axes, state)


def state_specs(state, mesh):
    """The PartitionSpec of every leaf of a `GenState` (`state_axes` under the rules) on a Mesh or AbstractMesh."""
    is_axes = lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)  # noqa: E731
    return jax.tree.map(
        lambda ax, x: sharding.logical_spec(ax, x.shape, mesh), state_axes(state), state, is_leaf=is_axes
    )


def place_state(state, mesh: jax.sharding.Mesh | None):
    """A `GenState` made on the host or one device, placed as `constrain_state` keeps it (several processes:
    as `readable_shardings` returns it from every step)."""
    if mesh is None:
        return state
    if multiprocess(mesh):
        return sharding.put(jax.device_get(state), readable_shardings(state, mesh))
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, state_specs(state, mesh))


# ----------------------------------------------------------------------------- several processes
# Under jax.distributed every process runs the same steps on the same host inputs (prompts, chunks, sampling
# settings) and reads the same small results. A process can read (np.asarray) only an array whose every shard
# it holds or that is replicated, so there the steps take host inputs as replicated global arrays
# (`global_args`) and return every leaf but the KV buffers replicated (`readable_shardings`): the per-row
# results are gathered once per step inside the program, and the cache stays split.


def multiprocess(mesh: jax.sharding.Mesh | None) -> TypeGuard[jax.sharding.Mesh]:
    """The mesh spans the devices of several processes (`anjax.core.sharding.init_distributed`)."""
    return mesh is not None and jax.process_count() > 1


def readable_shardings(tree, mesh: jax.sharding.Mesh):
    """Shardings for a step's outputs (any pytree of arrays or shapes): keys/values (and policies' `mass`) split
    as `state_specs` splits them, every other leaf replicated."""

    def spec(path, x):
        names = [getattr(k, "name", None) for k in path]
        if "keys" in names or "values" in names:
            return NamedSharding(mesh, sharding.logical_spec(KV_AXES[5 - x.ndim :], x.shape, mesh))
        if "mass" in names:
            return NamedSharding(mesh, sharding.logical_spec(KV_AXES[:4], x.shape, mesh))
        return NamedSharding(mesh, jax.sharding.PartitionSpec())

    return jax.tree_util.tree_map_with_path(spec, tree)


def global_args(args, mesh: jax.sharding.Mesh):
    """Every leaf that is not yet a global array over the mesh (numpy, Python scalars, one device's arrays),
    replicated over it; the same value on every process."""

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.device_set == set(mesh.devices.flat):
            return x
        return sharding.put(np.asarray(x), NamedSharding(mesh, jax.sharding.PartitionSpec()))

    return jax.tree.map(put, args)


def constrain_state(state):
    """Inside a jitted step traced under a mesh: the state's rows over data, its KV heads over tensor
    (`state_axes`); without a mesh, the state itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return state
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, s), state, state_specs(state, mesh))
