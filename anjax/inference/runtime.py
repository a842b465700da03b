"""What the engine and the scorer share: one compile cache with compile-time accounting, one bucketing rule.

`Runtime.call(fn, static, *args)` runs `fn(*static, *args)` through an executable compiled once per
(fn, static settings, argument tree, shapes and dtypes); the seconds spent compiling add up in
`compile_seconds`, and `with runtime.timer() as t:` measures a block with that compile time left out
(device time only). `bucket` rounds a length up to one of few sizes, so few shapes compile;
`round_up` and `right_align` lay rows out in whole chunks. A runtime over a mesh (`anjax.inference.placement`)
traces under it, with the logical-axis rules in force, and tells apart inputs placed differently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np

from anjax.core import sharding
from anjax.inference import placement


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` >= n (at least `multiple`)."""
    return max(multiple, -(-n // multiple) * multiple)


def bucket(n: int, low: int) -> int:
    """The smallest of low * {1, 1.5, 2, 3, 4, 6, ...} >= n: few shapes, at most 50% padding."""
    size = low
    while size < n:
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return size


def right_align(rows: Sequence[Sequence[int]], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, valid) [B, W]: rows right-aligned in a width W that is a multiple of `chunk`."""
    width = round_up(max(len(r) for r in rows), chunk) if any(rows) else 0
    tokens = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        if len(r):
            tokens[b, width - len(r) :] = r
            valid[b, width - len(r) :] = True
    return tokens, valid


@dataclasses.dataclass
class Timer:
    """Seconds of a `Runtime.timer()` block, compile time excluded (set when the block ends)."""

    seconds: float = 0.0


class Runtime:
    """One compile cache (`executables`) and the compile seconds it has spent (`compile_seconds`), on one device
    or over `mesh` (a (data, fsdp, tensor) `jax.sharding.Mesh`, `placement.inference_mesh`)."""

    def __init__(self, mesh: jax.sharding.Mesh | None = None):
        self.executables: dict = {}
        self.compile_seconds = 0.0
        self.mesh = mesh

    def place_state(self, state):
        """A new `GenState` where the steps keep it (`placement.place_state`)."""
        return placement.place_state(state, self.mesh)

    def call(self, fn: Callable, static: tuple, *args, donate: tuple[int, ...] = ()):
        """`fn(*static, *args)` through an executable compiled once per static settings and shapes.

        `donate`: positions in `args` whose buffers the call may reuse (a cache updated in place).
        """
        mesh = self.mesh
        several = placement.multiprocess(mesh)
        if several:
            args = placement.global_args(args, mesh)
        leaves, tree = jax.tree.flatten(args)
        placed = (lambda x: getattr(x, "sharding", None)) if mesh else (lambda x: None)
        key = (
            fn,
            static,
            donate,
            tree,
            tuple((np.shape(x), np.result_type(getattr(x, "dtype", x)), placed(x)) for x in leaves),
        )
        if (exe := self.executables.get(key)) is None:
            t0 = time.perf_counter()
            step = functools.partial(fn, *static)
            with sharding.active(mesh) if mesh else contextlib.nullcontext():
                shapes = jax.eval_shape(step, *args) if several else None
                out = {"out_shardings": placement.readable_shardings(shapes, mesh)} if several else {}
                exe = jax.jit(step, donate_argnums=donate, **out).lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.executables[key] = exe
        return exe(*args)

    @contextlib.contextmanager
    def timer(self) -> Iterator[Timer]:
        """Times the block minus the compile seconds spent inside it."""
        t, before, t0 = Timer(), self.compile_seconds, time.perf_counter()
        try:
            yield t
        finally:
            t.seconds = time.perf_counter() - t0 - (self.compile_seconds - before)
