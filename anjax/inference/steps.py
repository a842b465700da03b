"""The jitted device side of generation: chunked prefill into a compacted cache, the decode step and loop.

Every function here is a pure function of `(cfg, spec, params, state, arrays)`, jitted by the caller
(`anjax.inference.runtime.Runtime.call`) with the model config, the `EngineSpec` and the shapes static; the
host side (`anjax.inference.engine.Engine`, `anjax.serve.scheduler`, `anjax.inference.scoring`) lays rows
out and calls them. One batch of B rows (rows are independent; any row gives what it gives alone):
1. Prefill (`prefill_step`, `prefill`): a chunk [B, T] of right-aligned prompt tokens (padding is invalid) is
   appended to the cache, attends to the compacted cache plus itself under `anjax.core.mask.attention_allowed`,
   then the cache is compacted (`anjax.core.cache.keep_slots`: the anchor cache keeps anchors + the open
   sentence (+ protected tokens), the full cache keeps every valid slot).
2. Decode (`decode_loop`): a `lax.while_loop` of `decode_step`s feeds the last prompt token, then each sampled
   token, one per step; per-row done flags (stop ids, max_new_tokens, overflow). When a fed token is an anchor
   its sentence is dropped (`anjax.core.cache.close_sentence`, O(1 slot)).
Only compaction differs between the anchor and the full cache (which uses plain causal attention). Under a
training-free cache policy (`EngineSpec.policy`) the prompt is held whole, cut to the budget when decoding
starts and evicted as it decodes (`anjax.inference.policies`).

Positions (docs/DESIGN.md Invariant 2): a token's RoPE position is its true position in the row; the cache
length is not a position, so the anchor cache is exact (logits equal one full forward pass under the AnSAN
mask). `EngineSpec.reference_positions` reproduces the AnLLM authors' code instead: position = the token's
slot index in the compacted cache (stored slots re-based after every compaction). It is inexact; for
comparison only.

Capacity: a prefill buffer has C + T slots, a decode buffer C + 1 (the tokens in flight); a row that would
keep more than C slots between steps stops and is flagged in `GenState.overflow` (`anjax.inference.state.track`);
nothing is truncated.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from anjax.core.cache import KVCache, close_sentence, compact, evict, fit_slots, keep_slots, resize
from anjax.core.config import ModelConfig
from anjax.core.mask import TokenMeta, is_anchor, protected_tokens
from anjax.core.model import Llama
from anjax.core.params import with_scan_layers
from anjax.inference import placement, policies
from anjax.inference.sampling import Sampling, sample_tokens
from anjax.inference.state import (
    EngineSpec,
    GenState,
    advance_sentence,
    chunk_meta,
    next_positions,
    track,
)


class DecodeCarry(flax.struct.PyTreeNode):
    """The `lax.while_loop` carry."""

    state: GenState
    step: jax.Array  # scalar
    token: jax.Array  # [B] next token to feed
    protected: jax.Array  # [B] bool, that token is protected
    tokens: jax.Array  # [B, N] generated ids
    generated: jax.Array  # [B] count


@dataclasses.dataclass
class Prefilled:
    """A prefilled batch carried between prefill calls and into decode (on the host): the state, its rows
    (dummies last), the number of real rows, capacity, seconds, and the chunks not fed yet
    (`Engine.prefill(..., chunks=k)`; `Engine.prefill_more` feeds them)."""

    state: GenState
    rows: list[list[int]]
    protected: list[list[bool]]  # per row and token
    n: int
    capacity: int
    seconds: float
    left: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)  # [B, T] each

    @property
    def complete(self) -> bool:
        return not self.left


def _rebase(cache: KVCache, spec: EngineSpec) -> KVCache:
    """Reference positions: every kept slot's position becomes its slot index."""
    if not spec.reference_positions:
        return cache
    return cache.replace(meta=cache.meta.replace(pos=jnp.where(cache.valid, jnp.arange(cache.capacity), 0)))


def prefill_step(
    cfg: ModelConfig,
    spec: EngineSpec,
    params,
    state: GenState,
    tokens_BxT: jax.Array,
    valid_BxT: jax.Array,
    protected_BxT: jax.Array | None = None,
) -> tuple[jax.Array, GenState]:
    """Append one chunk [B, T] (exact under the predicate), then compact. Returns (logits [B, T, V], state).

    The cache has C + T slots; a row that keeps more than C afterwards is flagged (`overflow`).
    """
    T = tokens_BxT.shape[1]
    meta = chunk_meta(spec, state, tokens_BxT, valid_BxT, protected_BxT)
    logits, cache = Llama(cfg).apply(
        {"params": params}, tokens_BxT, meta, state.cache, full_attention=not spec.anchor_cache
    )
    assert isinstance(cache, KVCache)  # flax types `apply`'s result loosely
    sentence = advance_sentence(spec, state, meta.anchor, meta.valid)
    next_pos = state.next_pos + meta.valid.sum(1, dtype=jnp.int32)
    keep = keep_slots(cache, sentence["open_seg"], not spec.anchor_cache, cfg.anchor_window, next_pos)
    cache = compact(cache, keep)
    state = state.replace(cache=_rebase(cache, spec), next_pos=next_pos, **sentence)
    return logits, placement.constrain_state(track(state, ~state.done, cache.capacity - T))


def prefill(cfg, spec, params, state, tokens_BxT, valid_BxT, protected_BxT=None) -> GenState:
    """`prefill_step` without its logits (XLA then skips the vocabulary projection): the engine's and the
    scorer's one prefill of a chunk [B, T]."""
    return prefill_step(cfg, spec, params, state, tokens_BxT, valid_BxT, protected_BxT)[1]


def start_decode(state: GenState, spec: EngineSpec, slots: int) -> GenState:
    """Resize the cache to `slots` (+1 for the token in flight) and locate each open sentence's tail
    (the slots after the last one that is protected or not in the open sentence). Under a cache policy
    the prompt is first cut to the budget (`policies.compress`); the peak counts from there."""
    if spec.policy is not None:
        state = policies.compress(spec.policy, state)
        state = state.replace(mass=fit_slots(state.policy_arrays()[1], slots + 1, 3), peak=state.cache.length)
    cache = resize(state.cache, slots + 1)
    before_BxC = cache.valid & ((cache.seg != state.open_seg[:, None]) | cache.protected)
    open_start_B = jnp.max(jnp.where(before_BxC, jnp.arange(1, cache.capacity + 1), 0), axis=1)
    return state.replace(cache=cache, open_start=open_start_B.astype(jnp.int32))


def feed_token(
    cfg: ModelConfig,
    spec: EngineSpec,
    params,
    state: GenState,
    token_B: jax.Array,
    protected_B: jax.Array | None = None,
) -> tuple[jax.Array, GenState]:
    """One decode step for the rows not done: append `token_B`, close its sentence if it is an anchor.

    Returns (logits [B, V], state); the caller checks the capacity (`track`). Under a cache policy
    the token attends to the kept slots and evicts by the policy (`policies.feed_token`).
    """
    if spec.policy is not None:
        return policies.feed_token(cfg, spec, params, state, token_B)
    active_B = ~state.done
    anchor_B = is_anchor(token_B, spec.anchor_ids) & active_B
    protected_B = protected_tokens(protected_B, state.next_pos, active_B, spec.sink_tokens)  # sinks: true positions
    meta = TokenMeta(
        doc=jnp.zeros_like(token_B)[:, None],
        pos=next_positions(state, spec)[:, None],
        seg=state.open_seg[:, None],
        anchor=anchor_B[:, None],
        protected=protected_B[:, None],
        valid=active_B[:, None],
    )
    logits, cache = Llama(cfg).apply(
        {"params": params}, token_B[:, None], meta, state.cache, full_attention=not spec.anchor_cache
    )
    assert isinstance(cache, KVCache)  # flax types `apply`'s result loosely
    cache = cache.replace(length=jnp.where(active_B, cache.length, state.cache.length))
    open_start = state.open_start
    if spec.anchor_cache and cfg.anchor_window:  # the oldest slot of the window leaves at every step
        keep_BxC = keep_slots(cache, state.open_seg + anchor_B, False, cfg.anchor_window, state.next_pos + active_B)
        cache = evict(cache, keep_BxC)
    elif spec.anchor_cache:
        cache = close_sentence(cache, anchor_B, open_start)
        open_start = jnp.where(anchor_B | protected_B, cache.length, open_start)
    state = state.replace(
        cache=_rebase(cache, spec),
        next_pos=state.next_pos + active_B,
        open_start=open_start,
        **advance_sentence(spec, state, anchor_B[:, None], active_B[:, None]),
    )
    return logits[:, 0], state


def decode_step(
    cfg: ModelConfig,
    spec: EngineSpec,
    params,
    state: GenState,
    token_B: jax.Array,
    protected_B: jax.Array,
    sampling: Sampling,
    index_B: jax.Array,
    limit_B: jax.Array | int,
) -> tuple[jax.Array, GenState]:
    """One decode step for the rows not done: feed `token_B`, then pick each row's next id [B].

    Row b's draw uses the key fold_in(key(seed[b]), index_B[b]) (index: the id's place among the
    row's generated ids), so a row's output depends on its own seed and ids only, never on the
    other rows or on when it started. A row that picks a stop id, reaches `limit_B` ids or
    overflows the cache is marked done. Returns (next ids [B], state).
    """
    active_B = ~state.done
    logits_BxV, st = feed_token(cfg, spec, params, state, token_B, protected_B)
    keys_B = jax.vmap(jax.random.fold_in)(jax.vmap(jax.random.key)(sampling.seed), index_B)
    nxt_B = sample_tokens(logits_BxV, keys_B, sampling.temperature, sampling.top_k, sampling.top_p)
    if spec.ac_id >= 0:  # AC mode: force <AC> after max_sentence_tokens tokens without one (under any cache)
        force_B = (sampling.max_sentence_tokens > 0) & (st.open_len >= sampling.max_sentence_tokens)
        nxt_B = jnp.where(force_B, spec.ac_id, nxt_B)
    stop_B = (nxt_B[:, None] == sampling.stop_ids[None]).any(-1) | (index_B + 1 >= limit_B)
    st = track(st, active_B, st.cache.capacity - 1)  # before stopping: the last fed token counts too
    return nxt_B, placement.constrain_state(st.replace(done=st.done | (active_B & stop_B)))


def decode_loop(
    cfg: ModelConfig,
    spec: EngineSpec,
    slots: int,
    max_new_tokens: int,
    params,
    state: GenState,
    token_B: jax.Array,
    protected_B: jax.Array,
    sampling: Sampling,
) -> DecodeCarry:
    """Generate up to `max_new_tokens` per row in one `lax.while_loop` of `decode_step`s, starting by
    feeding `token_B` (the last prompt token; `protected_B` [B] bool: it is protected).

    With `spec.split_layers` the loop runs unrolled layers on per-layer weights (as the `Engine` holds them;
    stacked ones are sliced here, a copy per call) and cache buffers (`Engine.prefill` fills them split; a stacked
    cache is split before the loop; returned split: stacking them again cost a 16-row 1k cache 1.3 s per call),
    each read and written in place: on XLA:CPU a
    scanned layer copies its slice of the stacked weights before its matvecs, and unrolled layers copy a stacked
    cache (README: Decode)."""
    state = start_decode(state, spec, slots)
    if spec.split_layers:
        cfg, params = with_scan_layers(cfg, params, False)
        state = state.replace(cache=state.cache.split_layers())
    B = token_B.shape[0]

    def cond(c: DecodeCarry):
        return (c.step < max_new_tokens) & ~jnp.all(c.state.done)

    def body(c: DecodeCarry):
        active_B = ~c.state.done
        nxt_B, st = decode_step(cfg, spec, params, c.state, c.token, c.protected, sampling, c.generated, max_new_tokens)
        return DecodeCarry(
            state=st,
            step=c.step + 1,
            token=nxt_B,
            protected=jnp.zeros_like(c.protected),
            tokens=c.tokens.at[:, c.step].set(jnp.where(active_B, nxt_B, -1)),
            generated=c.generated + active_B,
        )

    carry = DecodeCarry(
        state=state,
        step=jnp.zeros((), jnp.int32),
        token=token_B,
        protected=protected_B,
        tokens=jnp.full((B, max_new_tokens), -1, jnp.int32),
        generated=jnp.zeros((B,), jnp.int32),
    )
    return jax.lax.while_loop(cond, body, carry)
