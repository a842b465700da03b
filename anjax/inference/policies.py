"""Training-free KV-cache policies at a fixed budget of slots per row: `window`, `snapkv`, `h2o`; and
training-free SepLLM (`SepLLM`), which is an anchor cache, not a policy of its own.

    state, mass = observe(cfg, (policy,), ...)         # full-attention prefill chunk that records attention mass
    state, _ = select(policy, state, mass[0], budget_B)  # each row keeps min(budget, prompt) slots per KV head
    logits, state, mass = stream_step(cfg, policy, ...)  # perplexity: evict after every chunk of a row
    state = prefill_chunk(...); compress(...); feed_token(...)  # generation (`anjax.inference.steps`)

The prompt is prefilled with plain causal attention (the full cache, as in kvpress: a press
compresses the context after its forward), then every layer's cache is cut to `budget` slots
per KV head; later tokens attend to the kept slots and to themselves (the kept set defines what
is attended; `anchor` stays defined by `anjax.core.mask.attention_allowed`). Per slot j < n
(n prompt tokens, b = min(budget, n) kept):

- `window` (StreamingLLM): the first `sink` tokens and the last b − sink (the same for every head).
- `snapkv` (SnapKV): the last `obs` tokens (observation window) and the top b − obs of the others
  by the attention mass they receive from the window's queries, summed over the query heads of
  the KV group and average-pooled over slots (kernel `kernel`, zero padding, as kvpress and the
  paper's code do); per layer and KV head.
- `h2o` (H2O, at prefill): the last b − b // 2 tokens (recent) and the top b // 2 of the others by
  the attention mass they receive from every prompt query (heavy hitters); per layer and KV head.

Generation (`Engine` with `EngineConfig(cache=policy, budget=...)`): the prompt but its last token is
prefilled and observed as above (`prefill_chunk`), `compress` cuts it to the budget, then every decoded
token attends to the kept slots and itself (`feed_token`): `window` and `h2o` evict back to the budget
after each token (StreamingLLM's rolling window; H2O's decode-time eviction, the new token's attention
added to the kept slots' mass); `snapkv` appends (SnapKV compresses the prompt only, so its cache grows
by the generated tokens).

Streamed (`stream_step`, held-out perplexity): every chunk of a row is prefilled against the kept slots,
then each layer and KV head is cut back to the budget; n above is then the slots held after the chunk.

Per-head selection is exact: `select` gathers each (layer, KV head)'s kept slots to its front
(`anjax.core.cache.pack_order`), so slot i of every head is valid iff i < b and shapes stay fixed.
The shared slot metadata then describes head 0 of layer 0 (exact for `window`); under causal
attention later tokens only read `valid` and `pos` (< their own) from it, which hold for every head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from anjax.core.cache import compact, pack_order, write_slots
from anjax.core.config import ModelConfig
from anjax.core.model import Llama
from anjax.inference.state import EngineSpec, GenState, advance_sentence, chunk_meta, track

POLICIES = ("window", "snapkv", "h2o")
FULL = EngineSpec(anchor_cache=False)
# SepLLM's separators (Chen et al., ICML 2025) but its whitespace ones, which BPE vocabularies fold into words
SEPLLM_SEPARATORS = (".", ",", "?", "!", ";", ":")


@dataclasses.dataclass(frozen=True)
class SepLLM:
    """Training-free SepLLM on any model, as the anchor cache of a scheme: EP anchors at SepLLM's separators,
    `anchor_rule="sepllm"` (every token sees earlier separators), a window of `window` neighbouring positions
    and the first `sink` tokens protected (`anjax.core.mask.attention_allowed`); the cache keeps exactly what
    that mask can reach (`anjax.core.cache.keep_slots`), so its budget is its own, like the anchor cache's.
    Beyond SepLLM's mask, a token also sees its whole sentence (AnSAN's rule; the cache keeps the open one).
    `anjax.inference.scoring.sepllm_model` makes that scheme for a model."""

    window: int = 64
    sink: int = 4
    separators: tuple[str, ...] = SEPLLM_SEPARATORS

    def __post_init__(self):
        if self.window < 0 or self.sink < 0 or not self.separators:
            raise ValueError(f"SepLLM needs window >= 0, sink >= 0 and separators, got {self}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A policy and its settings (static under jit); defaults: kvpress's sink 4 and kernel 5, window 8."""

    kind: str
    sink: int = 4  # window: first tokens always kept (attention sinks)
    obs: int = 8  # snapkv: observation window, the last prompt tokens
    kernel: int = 5  # snapkv: average-pool kernel over slots (odd)

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"unknown cache policy {self.kind!r}; known: {', '.join(POLICIES)}")
        if self.sink < 0 or self.obs < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"need sink >= 0, obs >= 1 and an odd kernel >= 1, got {self}")

    @property
    def observer(self) -> Policy | None:
        """The settings its mass depends on (`observe` records each distinct observer's once);
        None for `window`, which selects by position after a plain full-cache prefill."""
        if self.kind == "window":
            return None
        return Policy(self.kind, obs=self.obs) if self.kind == "snapkv" else Policy(self.kind)

    def query_weight(self, valid_BxT: jax.Array, pos_BxT: jax.Array, n_B: jax.Array) -> jax.Array:
        """[B, T] 0/1: the prompt queries whose attention counts (snapkv: the last `obs` of n; h2o: all)."""
        if self.kind == "snapkv":
            return valid_BxT & (pos_BxT >= n_B[:, None] - self.obs)
        return valid_BxT

    def keep(self, mass_LxBxKxC: jax.Array, n_B: jax.Array, b_B: jax.Array) -> jax.Array:
        """[L, B, K, C] bool: the b_B (<= n_B) slots each layer and KV head keeps."""
        j_C = jnp.arange(mass_LxBxKxC.shape[-1])
        row = lambda x_B: x_B[None, :, None, None]
        n, b = row(n_B), row(b_B)
        if self.kind == "window":
            sink = jnp.minimum(self.sink, b)
            keep = (j_C < sink) | ((j_C >= n - (b - sink)) & (j_C < n))
            return jnp.broadcast_to(keep, mass_LxBxKxC.shape)
        if self.kind == "snapkv":
            window = jnp.minimum(self.obs, b)
            score = _avg_pool(jnp.where(j_C < n - self.obs, mass_LxBxKxC, 0.0), self.kernel)
        else:
            window = b - b // 2
            score = mass_LxBxKxC
        recent = (j_C >= n - window) & (j_C < n)
        return recent | _top(score, j_C < n - window, b - window)


def _avg_pool(x_xC: jax.Array, kernel: int) -> jax.Array:
    """Mean over each slot's `kernel` neighbours along the last axis, zeros beyond the ends (avg_pool1d)."""
    pad = [(0, 0)] * (x_xC.ndim - 1) + [(kernel // 2, kernel // 2)]
    window = (1,) * (x_xC.ndim - 1) + (kernel,)
    return jax.lax.reduce_window(x_xC, 0.0, jax.lax.add, window, (1,) * x_xC.ndim, pad) / kernel


def _top(score_LxBxKxC: jax.Array, candidate_LxBxKxC: jax.Array, count: jax.Array) -> jax.Array:
    """The `count` candidates with the highest score along the last axis (ties: the earlier slot)."""
    score = jnp.where(candidate_LxBxKxC, score_LxBxKxC, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-score, axis=-1, stable=True), axis=-1, stable=True)
    return candidate_LxBxKxC & (rank < count)


def _layer_mass(variables: Mapping[str, Any], cfg: ModelConfig) -> jax.Array:
    """[L, I, B, K, S] key mass sown by every layer (`anjax.core.model.Attention`)."""
    inter = variables["intermediates"]
    if cfg.scan_layers:
        return inter["layers"]["attn"]["key_mass"][0]
    return jnp.stack([inter[f"layer_{i}"]["attn"]["key_mass"][0] for i in range(cfg.num_layers)])


def observe_step(
    cfg: ModelConfig,
    observers: tuple[Policy, ...],
    params,
    state: GenState,
    mass_IxLxBxKxC: jax.Array,
    tokens_BxT: jax.Array,
    valid_BxT: jax.Array,
    n_B: jax.Array,
    spec: EngineSpec = FULL,
) -> tuple[jax.Array, GenState, jax.Array]:
    """Prefill one chunk of a prompt of n_B tokens with the full cache (C + T slots, as `prefill_step`)
    and add to mass[i] [L, B, K, C] the attention mass each slot receives from `observers[i].query_weight`'s
    queries (one forward for every observer; kept in slot order through the compaction; no observer:
    `mass` [0, L, B, K, C] comes back as given). `spec` marks anchors and sentences in the slots' metadata (for the
    engine's `<AC>` forcing; attention stays full). Returns (logits [B, T, V], state, mass)."""
    meta = chunk_meta(spec, state, tokens_BxT, valid_BxT)
    weight_IxBxT = jnp.stack([p.query_weight(meta.valid, meta.pos, n_B) for p in observers]) if observers else None
    (logits, cache), variables = Llama(cfg).apply(
        {"params": params},
        tokens_BxT,
        meta,
        state.cache,
        full_attention=True,
        mass_weight_IxBxT=weight_IxBxT,
        mutable=["intermediates"],
    )
    offset_B = state.cache.length  # the chunk's first slot
    state = state.replace(
        cache=compact(cache, cache.valid),
        next_pos=state.next_pos + meta.valid.sum(1, dtype=jnp.int32),
        **advance_sentence(spec, state, meta.anchor, meta.valid),
    )
    if not observers:
        return logits, state, mass_IxLxBxKxC
    I, L, B, K, C = mass_IxLxBxKxC.shape  # observers and layers as one axis below: [I * L, B, K, ...]
    step_NxBxKxS = _layer_mass(variables, cfg).swapaxes(0, 1).reshape(I * L, B, K, -1)
    mass = write_slots(
        (mass_IxLxBxKxC.reshape(I * L, B, K, C) + step_NxBxKxS[..., :C])[..., None],
        step_NxBxKxS[..., C:, None],
        offset_B,
    )
    order_BxC, live_BxC = pack_order(cache.valid)
    mass = jnp.take_along_axis(mass[..., 0], order_BxC[None, :, None], axis=3)
    return logits, state, jnp.where(live_BxC[None, :, None], mass, 0.0).reshape(I, L, B, K, C)


def observe(cfg, observers, params, state, mass_IxLxBxKxC, tokens_BxT, valid_BxT, n_B) -> tuple[GenState, jax.Array]:
    """`observe_step` without its logits (XLA then skips the vocabulary projection): the prompt prefill of
    the policies' scoring paths -> (state, mass)."""
    return observe_step(cfg, observers, params, state, mass_IxLxBxKxC, tokens_BxT, valid_BxT, n_B)[1:]


def select(policy: Policy, state: GenState, mass_LxBxKxC: jax.Array, budget_B: jax.Array) -> tuple[GenState, jax.Array]:
    """Keep min(budget, n) slots per row in every layer and KV head (`Policy.keep`), gathered to the front;
    -> (state, the kept slots' mass [L, B, K, C] gathered alike, zero elsewhere)."""
    cache = state.cache
    n_B = cache.length
    b_B = jnp.minimum(budget_B, n_B).astype(jnp.int32)
    order_LxBxKxC, live_LxBxKxC = pack_order(policy.keep(mass_LxBxKxC, n_B, b_B))

    def take_kv(x_LxBxKxCxD):
        x = jnp.take_along_axis(x_LxBxKxCxD, order_LxBxKxC[..., None], axis=3)
        return jnp.where(live_LxBxKxC[..., None], x, jnp.zeros((), x.dtype))

    order_BxC, live_BxC = order_LxBxKxC[0, :, 0], live_LxBxKxC[0, :, 0]

    def take_meta(x_BxC):
        return jnp.where(live_BxC, jnp.take_along_axis(x_BxC, order_BxC, axis=1), jnp.zeros((), x_BxC.dtype))

    state = state.replace(cache=cache.map_slots(take_kv, take_meta).replace(length=b_B))
    return state, take_kv(mass_LxBxKxC[..., None])[..., 0]


def stream_step(
    cfg: ModelConfig,
    policy: Policy,
    params,
    state: GenState,
    mass_LxBxKxC: jax.Array,
    budget_B: jax.Array,
    tokens_BxT: jax.Array,
    valid_BxT: jax.Array,
    spec: EngineSpec = FULL,
) -> tuple[jax.Array, GenState, jax.Array]:
    """One chunk [B, T] of a streamed row: prefill it with full attention against the kept slots (`observe_step`),
    then keep min(budget, held) slots per layer and KV head (`select`). -> (logits [B, T, V], state, mass).

    The policy's mass is that of this chunk's queries: `h2o` adds it to the kept slots' mass carried from
    the earlier chunks (with T = 1 this is H2O's decode-time eviction: every new token's attention
    accumulates, the lightest slot outside the recent half goes); `snapkv` observes only the last `obs`
    tokens of this chunk (a fresh observation window per chunk; its window is the last `obs` slots of each
    head); `window` keeps the first `sink` slots and the most recent ones. Shapes stay fixed: a cache of
    C = budget + T slots, one compile for every chunk.
    """
    observers = (policy.observer,) if policy.observer else ()
    carried = mass_LxBxKxC if policy.kind == "h2o" else jnp.zeros_like(mass_LxBxKxC)
    end_B = state.next_pos + valid_BxT.sum(1, dtype=jnp.int32)  # the chunk ends the prompt seen so far
    logits, state, mass = observe_step(
        cfg, observers, params, state, carried[None][: len(observers)], tokens_BxT, valid_BxT, end_B, spec
    )
    return (logits, *select(policy, state, mass[0] if observers else carried, budget_B))


def fraction_slots(fraction: float, n: int) -> int:
    """The slots a policy keeps of n tokens at a budget fraction F in (0, 1]: max(1, ⌊F × n⌋)."""
    return max(1, int(fraction * n))


def prefill_chunk(
    cfg: ModelConfig, spec: EngineSpec, params, state: GenState, tokens_BxT: jax.Array, valid_BxT: jax.Array, n_B
) -> GenState:
    """Generation under `spec.policy`: prefill one chunk [B, T] of prompts of n_B [B] fed tokens with the full
    cache, adding the observer's attention mass to `state.mass` [L, B, K, C + T] (the cache's slots); rows that would
    hold more than C slots are flagged (`track`)."""
    observers = (spec.policy.observer,) if spec.policy.observer else ()
    mass_IxLxBxKxC = state.policy_arrays()[1][None][: len(observers)]
    _, state, mass = observe_step(cfg, observers, params, state, mass_IxLxBxKxC, tokens_BxT, valid_BxT, n_B, spec)
    if observers:
        state = state.replace(mass=mass[0])
    return track(state, ~state.done, state.cache.capacity - tokens_BxT.shape[1])


def compress(policy: Policy, state: GenState) -> GenState:
    """After the prompt: each row keeps min(state.budget, held) slots per layer and KV head (`select`)."""
    budget_B, mass_LxBxKxC = state.policy_arrays()
    state, mass = select(policy, state, mass_LxBxKxC, budget_B)
    return state.replace(mass=mass)


def feed_token(cfg: ModelConfig, spec: EngineSpec, params, state: GenState, token_B: jax.Array):
    """One decode token [B] under `spec.policy` for the rows not done -> (logits [B, V], state): it attends to the
    kept slots and itself; `window` and `h2o` then evict back to the budget (`stream_step` with T = 1), `snapkv`
    keeps it (the cache grows by one slot)."""
    tokens_Bx1, valid_Bx1 = token_B[:, None], ~state.done[:, None]
    budget_B, mass_LxBxKxC = state.policy_arrays()
    if spec.policy.kind == "snapkv":  # no observer: the mass is given and returned as is
        no_mass = mass_LxBxKxC[None][:0]
        logits, state, _ = observe_step(cfg, (), params, state, no_mass, tokens_Bx1, valid_Bx1, state.next_pos, spec)
        return logits[:, 0], state
    logits, state, mass = stream_step(
        cfg, spec.policy, params, state, mass_LxBxKxC, budget_B, tokens_Bx1, valid_Bx1, spec
    )
    return logits[:, 0], state.replace(mass=mass)
