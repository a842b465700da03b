"""Continuous batching over a fixed number of decode slots (JetStream's prefill / insert / generate split), no HTTP.

    sched = Scheduler(engine, slots=8, capacity=1024, metrics=Metrics())
    sched.start()
    sched.submit(Request(prompt_ids, protected, max_tokens=32, emit=print))   # events: Delta, Finish, Failure

The device holds one `Slots` value: N rows of a decode cache of C + 1 slots (C = `capacity`) and
per-row sampling arrays [N]. One host thread (`Scheduler.run`) loops:
1. prefill / insert: while a slot is free and a request waits, prefill it alone (batch 1) one chunk of
   the engine's chunk size per loop turn (`Engine.prefill(chunks=1)`, then `Engine.prefill_more`: the
   one prefill), its partial 1-row state held between turns, so a long prompt never stalls the running
   slots for more than one chunk; after its last chunk write its row into the free slot (`insert`, the
   slot index a traced argument: one executable per prefill bucket);
2. generate: one `generate_step` for all N rows (`anjax.inference.steps.decode_step`; free rows are
   done and untouched), then each new id goes to its request. A slot is freed the moment its
   request stops: a stop id (EOS), `max_tokens`, a stop string, an overflow, a cancel (client gone).
Every shape is fixed (N, C, the chunk, the prefill buckets); sampling values are arrays, never static.

Batch invariance: a request's ids depend only on its prompt, its sampling values and its seed — not on
the other requests, its slot or when it was admitted. Each row is computed on its own at the same
shapes, and its k-th id is drawn with the key fold_in(key(seed), k) (`decode_step`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from anjax.core.config import ModelConfig
from anjax.inference import placement
from anjax.inference.sampling import Sampling, stop_id_array
from anjax.inference.state import EngineSpec, GenState, init_state
from anjax.inference.steps import Prefilled, decode_step, start_decode
from anjax.serve.metrics import Metrics

SEED_LIMIT = 2**32
LOG = logging.getLogger(__name__)


class AdmissionError(ValueError):
    """A request that can never be served as asked (HTTP 400); the message says why."""


class QueueFullError(RuntimeError):
    """The waiting queue is full (HTTP 429): retry later."""


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text of a request (may be empty while a stop string or a UTF-8 character is incomplete) and its new ids."""

    text: str
    ids: list[int]


@dataclasses.dataclass(frozen=True)
class Finish:
    """The request ended: reason "stop" (stop id or string), "length" (max_tokens) or "cache_full" (the
    anchor cache's capacity held no more anchors: a shorter prompt or a larger --capacity goes further)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failure:
    """The request could not be served; `status` is the HTTP status that fits."""

    message: str
    status: int = 400


Event = Delta | Finish | Failure


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request (ids already encoded) and where its events go (`emit`, called from the loop's thread)."""

    prompt_ids: list[int]
    protected: list[bool]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    cancelled: bool = False
    ids: list[int] = dataclasses.field(default_factory=list)  # generated so far
    sent: int = 0  # characters of text emitted
    submitted: float = 0.0


class Slots(flax.struct.PyTreeNode):
    """The decode batch on the device: N rows (one per slot); every field but `state` and `sampling` is [N]."""

    state: GenState  # cache of C + 1 slots; a free row is done
    token: jax.Array  # int32, the next id to feed
    protected: jax.Array  # bool, that id is protected
    sampling: Sampling  # temperature/top_k/top_p/seed [N]; stop_ids [MAX_STOP_IDS]; max_sentence_tokens scalar
    index: jax.Array  # int32, ids generated so far (the next draw's key index)
    limit: jax.Array  # int32, max_tokens


def init_slots(
    cfg: ModelConfig, n: int, capacity: int, stop_ids: Sequence[int], max_sentence_tokens: int, split: bool = False
) -> Slots:
    """N free slots of `capacity` + 1 cache slots each; `split`: the cache as per-layer buffers
    (`EngineSpec.split_layers`: the unrolled layers update them in place every step)."""
    state = init_state(cfg, n, capacity + 1, jnp.ones((n,), bool), split)
    zeros = lambda dtype: jnp.zeros((n,), dtype)
    return Slots(
        state=state,
        token=zeros(jnp.int32),
        protected=zeros(bool),
        sampling=Sampling(
            temperature=zeros(jnp.float32),
            top_k=zeros(jnp.int32),
            top_p=jnp.ones((n,), jnp.float32),
            seed=zeros(jnp.uint32),
            stop_ids=jnp.asarray(stop_id_array(stop_ids)),
            max_sentence_tokens=jnp.int32(max_sentence_tokens),
        ),
        index=zeros(jnp.int32),
        limit=zeros(jnp.int32),
    )


def insert(
    spec: EngineSpec,
    capacity: int,
    slots: Slots,
    row: GenState,
    token: jax.Array,
    protected: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seed: jax.Array,
    limit: jax.Array,
    slot: jax.Array,
) -> Slots:
    """Slots with a prefilled 1-row state (any prefill buffer size; its cache split as the slots' are, both by
    `EngineSpec.split_layers`) written into row `slot` (a traced int)."""
    row = start_decode(row, spec, capacity).replace(done=jnp.zeros((1,), bool))

    def put(big, small):  # stacked keys/values [L, B, K, C, D] have the batch on axis 1, every other leaf on axis 0
        return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, axis=1 if big.ndim == 5 else 0)

    set_ = lambda x, v: x.at[slot].set(jnp.asarray(v, x.dtype))
    samp = slots.sampling
    return slots.replace(
        state=placement.constrain_state(jax.tree.map(put, slots.state, row)),
        token=set_(slots.token, token),
        protected=set_(slots.protected, protected),
        sampling=samp.replace(
            temperature=set_(samp.temperature, temperature),
            top_k=set_(samp.top_k, top_k),
            top_p=set_(samp.top_p, top_p),
            seed=set_(samp.seed, seed),
        ),
        index=set_(slots.index, 0),
        limit=set_(slots.limit, limit),
    )


def generate_step(cfg: ModelConfig, spec: EngineSpec, params, slots: Slots, cancel_N: jax.Array):
    """One decode step for every live slot; rows in `cancel_N` [N] are made done first.

    Returns (next ids [N], the rows that produced one [N] bool, slots).
    """
    state = slots.state.replace(done=slots.state.done | cancel_N)
    active_N = ~state.done
    nxt_N, state = decode_step(
        cfg, spec, params, state, slots.token, slots.protected, slots.sampling, slots.index, slots.limit
    )
    slots = slots.replace(
        state=state, token=nxt_N, protected=jnp.zeros_like(slots.protected), index=slots.index + active_N
    )
    return nxt_N, active_N, slots


def visible_text(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be sent now: not an incomplete UTF-8 character, nor a start of a stop string."""
    end = safe = len(text.rstrip("\ufffd"))
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                safe = min(safe, end - k)
                break
    return safe


class Scheduler:
    """The slots, the waiting queue and the loop that serves them (module docstring).

    `engine`: the `anjax.inference.engine.Engine` it serves, made by the caller; it uses the engine's host
    calls (prefill, overflow messages, text) and runs the device steps itself (`anjax.inference.steps`).
    """

    def __init__(self, engine, slots: int, capacity: int, metrics: Metrics, max_queue: int = 64):
        if slots < 1 or capacity < 1 or max_queue < 1:
            raise ValueError(f"need slots, capacity and max_queue >= 1, got {slots}, {capacity}, {max_queue}")
        if engine.spec.policy is not None:
            raise ValueError(f"the server serves the anchor and full caches, not {engine.cache_kind!r}")
        self.engine, self.n, self.capacity, self.metrics, self.max_queue = engine, slots, capacity, metrics, max_queue
        cfg = engine.cfg
        self.stop_ids = () if cfg.eos_token_id is None else (cfg.eos_token_id,)
        self.max_sentence_tokens = engine.scheme.max_sentence_tokens or 0
        if slots % placement.rows(engine.runtime.mesh):
            raise ValueError(
                f"--slots {slots} must be a multiple of the mesh's data size {placement.rows(engine.runtime.mesh)}"
            )
        self.slots = init_slots(
            cfg, slots, capacity, self.stop_ids, self.max_sentence_tokens, split=engine.spec.split_layers
        )
        self.slots = self.slots.replace(state=engine.runtime.place_state(self.slots.state))  # rows over the mesh
        self.owner: list[Request | None] = [None] * slots
        self.admitting: Request | None = None  # popped from the queue, not yet in a slot
        self.prefilled: Prefilled | None = None  # its prefill so far (some chunks may be left)
        self.queue: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.stopping = self.draining = False
        self.failed: str | None = None  # why the loop stopped on an unexpected error
        self.thread: threading.Thread | None = None
        metrics.slots_total.set(slots)

    # ------------------------------------------------------------------ admission (any thread)

    def check(self, request: Request) -> None:
        """Raise AdmissionError for a request that can never be served (sizes, values)."""
        r, positions = request, self.engine.cfg.max_position_embeddings
        if not r.prompt_ids:
            raise AdmissionError("the prompt is empty")
        if bad := [t for t in r.prompt_ids if not 0 <= t < self.engine.cfg.vocab_size]:
            raise AdmissionError(f"prompt ids outside the vocabulary of {self.engine.cfg.vocab_size}: {bad[:3]}")
        if r.max_tokens < 1:
            raise AdmissionError(f"max_tokens must be >= 1, got {r.max_tokens}")
        if len(r.prompt_ids) + r.max_tokens > positions:
            raise AdmissionError(
                f"{len(r.prompt_ids)} prompt tokens + {r.max_tokens} max_tokens exceed the model's {positions} "
                "positions: shorten the prompt or lower max_tokens"
            )
        if not self.engine.spec.anchor_cache and len(r.prompt_ids) + r.max_tokens - 1 > self.capacity:
            raise AdmissionError(
                f"{len(r.prompt_ids)} prompt tokens + {r.max_tokens} max_tokens exceed the full cache's "
                f"{self.capacity} slots per request: shorten the prompt or lower max_tokens"
            )
        if not (0 <= r.temperature and r.top_k >= 0 and 0 < r.top_p <= 1 and 0 <= r.seed < SEED_LIMIT):
            raise AdmissionError(
                f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1 and 0 <= seed < 2**32, got "
                f"temperature={r.temperature}, top_k={r.top_k}, top_p={r.top_p}, seed={r.seed}"
            )

    def submit(self, request: Request) -> None:
        """Queue a request (AdmissionError: it can never fit; QueueFullError: the queue is full)."""
        self.check(request)
        with self.cv:
            if self.stopping or self.draining:
                raise QueueFullError("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests wait): retry later")
            request.submitted = time.perf_counter()
            self.queue.append(request)
            self.metrics.queue_length.set(len(self.queue))
            self.cv.notify()

    def cancel(self, request: Request) -> None:
        """The client is gone: drop the request from the queue, or free its slot at the next step."""
        with self.cv:
            request.cancelled = True
            if request in self.queue:
                self.queue.remove(request)
                self.metrics.queue_length.set(len(self.queue))
                self.metrics.requests.labels("cancelled").inc()
            self.cv.notify()

    def slots_in_use(self) -> int:
        return sum(r is not None for r in self.owner)

    # ------------------------------------------------------------------ the loop (one thread)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="anjax-scheduler", daemon=True)
        self.thread.start()

    def drain(self, seconds: float) -> None:
        """Shutting down: refuse new requests now; after `seconds`, `stop` (the requests still in flight
        end with a Failure, which a stream sends as its final event)."""
        with self.cv:
            self.draining = True
        timer = threading.Timer(seconds, self.stop)
        timer.daemon = True
        timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or in a slot get a Failure (503)."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        with self.cv:
            left = [r for r in [self.admitting, *self.queue, *self.owner] if r is not None]
            self.queue.clear()
            self.owner, self.admitting = [None] * self.n, None
        for r in left:
            r.emit(Failure("the server shut down before the request finished", 503))

    def run(self) -> None:
        """The loop; an unexpected error fails every request (500), stops it and sets `failed`."""
        try:
            while True:
                with self.cv:
                    while not (self.stopping or self.queue or any(self.owner) or self.admitting):
                        self.cv.wait()
                    if self.stopping:
                        return
                self._admit()
                if any(self.owner):
                    self._step()
        except Exception as e:  # noqa: BLE001 -- reported to every waiting client, on /health and in the log
            LOG.exception("the scheduler stopped")
            self.failed = f"{type(e).__name__}: {e}"
            with self.cv:
                self.stopping = True
                left = [self.admitting] + list(self.queue) + self.owner
                self.queue.clear()
                self.owner = [None] * self.n
            for r in left:
                if r is not None:
                    r.emit(Failure(f"internal error ({self.failed})", 500))

    def _pop(self) -> Request | None:
        with self.cv:
            request = self.queue.popleft() if self.queue else None
            self.metrics.queue_length.set(len(self.queue))
            return request

    def _admit(self) -> None:
        """Feed one prefill chunk of the request being admitted (the first waiting one, once a slot is
        free), so the requests in the slots keep generating while it prefills; after its last chunk,
        insert it into a free slot."""
        eng = self.engine
        while True:
            if self.admitting is None:
                if None not in self.owner or (waiting := self._pop()) is None:
                    return
                self.admitting = waiting
            r = self.admitting
            if r.cancelled:
                self.metrics.requests.labels("cancelled").inc()
                self.admitting = self.prefilled = None
                continue
            try:
                if self.prefilled is None:
                    pre = eng.prefill([r.prompt_ids], 1, eng.chunk_size, self.capacity, [r.protected], chunks=1)
                else:
                    pre = eng.prefill_more(self.prefilled)
                self.prefilled = pre
                if message := eng.overflow_message(np.asarray(pre.state.overflow)[0], self.capacity):
                    raise AdmissionError(message)
            except ValueError as e:
                self.metrics.requests.labels("error").inc()
                r.emit(Failure(str(e), 400))
                self.admitting = self.prefilled = None
                continue
            if not pre.complete:
                return
            self.metrics.prefill(len(r.prompt_ids) - 1, pre.seconds)
            b = self.owner.index(None)
            self.slots = eng.runtime.call(
                insert,
                (eng.spec, self.capacity),
                self.slots,
                pre.state,
                np.int32(r.prompt_ids[-1]),
                np.bool_(r.protected[-1]),
                np.float32(r.temperature),
                np.int32(r.top_k),
                np.float32(r.top_p),
                np.uint32(r.seed),
                np.int32(r.max_tokens),
                np.int32(b),
                donate=(0,),
            )
            self.owner[b], self.admitting, self.prefilled = r, None, None
            self.metrics.slots_in_use.set(self.slots_in_use())
            return

    def _step(self) -> None:
        """One decode step; deliver each new id; free the slots whose request stopped."""
        eng = self.engine
        cancel = np.array([r is None or r.cancelled for r in self.owner])
        with eng.runtime.timer() as timer:
            nxt, active, self.slots = eng.runtime.call(
                generate_step, (eng.cfg, eng.spec), eng.params, self.slots, cancel, donate=(1,)
            )
            nxt, active = np.asarray(nxt), np.asarray(active)
            done, overflow = np.asarray(self.slots.state.done), np.asarray(self.slots.state.overflow)
            held = np.asarray(self.slots.state.cache.length)
        self.metrics.decode(int(active.sum()), timer.seconds)
        for b, r in enumerate(self.owner):
            if r is None:
                continue
            if r.cancelled:
                self._free(b, r, "cancelled")
                continue
            if not active[b]:
                continue
            r.ids.append(int(nxt[b]))
            reason = None
            if done[b]:
                reason = "cache_full" if overflow[b, 0] else "length" if r.ids[-1] not in self.stop_ids else "stop"
            if self._deliver(r, final=reason is not None):
                reason = "stop"
            if reason:
                r.emit(Finish(reason, len(r.prompt_ids), len(r.ids)))
                self._free(b, r, "ok")
        self.metrics.cache_slots_held.set(int(sum(held[b] for b, r in enumerate(self.owner) if r is not None)))

    def _deliver(self, r: Request, final: bool) -> bool:
        """Emit the request's new text; True when a stop string ended it (the text stops before it)."""
        text = self.engine.decode_text(r.ids, self.stop_ids)
        hits = [i for i in (text.find(s) for s in r.stop) if i >= 0]
        if hits:
            text, final = text[: min(hits)], True
        end = len(text) if final else visible_text(text, r.stop)
        r.emit(Delta(text[r.sent : end] if end > r.sent else "", r.ids[-1:]))
        r.sent = max(r.sent, end)
        return bool(hits)

    def _free(self, b: int, r: Request, outcome: str) -> None:
        """Free slot `b`, which `r` held."""
        self.owner[b] = None
        self.metrics.requests.labels(outcome).inc()
        self.metrics.generation_tokens.inc(len(r.ids))
        self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        self.metrics.slots_in_use.set(self.slots_in_use())
