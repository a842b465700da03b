"""Log-likelihood scoring through the engine's device steps (`anjax.inference.steps`), with a full or an anchor cache.

    model = load_scoring_model(None, anchor_mode="ep")    # embedded SmolLM2, "." "?" "!" anchors
    scorer = Scorer(model)
    req = model.encode_request([("Question: Why?\nAnswer:", " Because."), ...])
    out = scorer.run([req], cache="anchor")               # out.loglik[0] = one value per choice

One `ScoreRequest` is a multiple-choice item in token ids: a shared `prefix`, and
per choice a context `tail` and a `continuation`. Cached paths (`recompute=False`):
1. the prefix minus its last token is prefilled once per item with
   `anjax.inference.steps.prefill_step` (chunks of T, compaction after each chunk: the
   anchor cache keeps anchors + the open sentence, the full cache every token);
2. the cache is cut to the slots in use, broadcast over the K choices, and each
   choice is fed as one right-padded chunk `prefix[-1:] + tail + continuation[:-1]`;
   the continuation's log-probability is summed from that chunk's logits (its first
   token is predicted by the prefix's last token).
The recompute path (`recompute=True`, the paper's "no cache" baseline) runs one
full forward of `prefix + tail + continuation` per choice, under the same mask.
Both are exact: a cached score equals the recomputed one (docs/DESIGN.md Invariant 2).

Tokenization: `anjax.text.encode.Encoder.pair`, lm-evaluation-harness's split
(`encode_pair`: trailing spaces of the context move to the continuation, `whole =
enc(context + continuation)`, the continuation is the rest of `whole`) with the
model's anchor scheme: BOS by the scheme (recorded at training; else the tokenizer's
own way, as the harness's HF model does; SmolLM2: no BOS), and in AC mode `<AC>`
wherever training puts it in the whole text — after every sentence of the context
(a blank line always ends one, so every few-shot demonstration ends with `<AC>`),
after the context when it ends a sentence, inside the continuation. `<AC>` targets
are never scored.

Memory: during prefill an anchor cache holds at most `kept_bound` slots (every
anchor + the longest sentence + the scheme's window) plus one chunk, a full cache the whole context plus
one chunk; the choices see the cache cut to the slots in use. Shapes are bucketed
(`anjax.inference.runtime.bucket`) so that a task compiles a handful of executables; `Scorer.compile_seconds`
is kept apart from the timed seconds.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import jax
import jax.numpy as jnp
import numpy as np

from anjax.core.config import ModelConfig
from anjax.core.mask import token_metadata
from anjax.core.model import Llama
from anjax.inference import placement, policies
from anjax.inference.model import prepare_model
from anjax.inference.policies import Policy, SepLLM
from anjax.inference.runtime import Runtime, bucket, right_align, round_up
from anjax.inference.state import EngineSpec, GenState, init_state
from anjax.inference.steps import prefill, prefill_step
from anjax.io.loading import load_model
from anjax.text.anchors import AnchorScheme, resolve_anchor_ids
from anjax.text.encode import Encoder

CACHE_KINDS = ("full", "anchor")


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass
class ScoringModel:
    """A model ready for scoring: layers stacked (`scan_layers`), anchor scheme resolved, params on the device
    or split over `mesh` (`anjax.inference.placement`); `sink_tokens` first tokens protected in the anchor cache
    (`anjax.core.mask`)."""

    cfg: ModelConfig
    params: Any
    tokenizer: Any
    name: str
    scheme: AnchorScheme
    mesh: jax.sharding.Mesh | None = None
    sink_tokens: int = 0

    @property
    def anchor_mode(self) -> str:
        return self.scheme.mode

    @property
    def anchor_ids(self) -> tuple[int, ...]:
        return self.scheme.ids

    @property
    def add_bos(self) -> bool:
        return self.scheme.add_bos

    @property
    def ac_id(self) -> int | None:
        return self.scheme.ac_id

    @property
    def encoder(self) -> Encoder:
        return Encoder(self.tokenizer, self.scheme)

    def encode_context(self, context: str) -> list[int]:
        """Context ids of a generation request: a prompt (`Encoder.prompt`); empty: the harness's prefix token."""
        tok = self.tokenizer
        if not context:  # the harness conditions an empty context on its prefix token
            return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        return self.encoder.prompt(context)[0]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids): `anjax.text.encode.Encoder.pair`."""
        return self.encoder.pair(context, continuation)

    def encode_request(self, pairs: Sequence[tuple[str, str]]) -> ScoreRequest:
        """One item from its (context, continuation) pairs; the shared prefix is the longest common one."""
        return ScoreRequest.from_ids([self.encode_pair(c, t) for c, t in pairs])

    def encode_text(self, text: str, ac_every: int | None = None) -> list[int]:
        """A whole text for perplexity (`Encoder.document`); `ac_every` overrides `max_sentence_tokens`."""
        scheme = self.scheme
        if ac_every is not None:
            if scheme.mode != "ac":
                raise ValueError("--ac-every inserts <AC> tokens: it needs anchor mode 'ac'")
            scheme = scheme.replace(max_sentence_tokens=ac_every or None)
        return Encoder(self.tokenizer, scheme).document(text)


def scoring_model(
    cfg: ModelConfig,
    params,
    tokenizer,
    *,
    anchor_mode: str | None = None,
    anchors: Sequence[str] | None = None,
    need_anchors: bool = False,
    name: str = "model",
    mesh: jax.sharding.Mesh | None = None,
) -> ScoringModel:
    """The model prepared for scoring (`anjax.inference.model.prepare_model`: scheme resolved, layers stacked,
    weights placed).

    The model's own scheme applies unless `anchor_mode`/`anchors` override it (said on stderr).
    `need_anchors` (an anchor cache was asked for) with no anchors is an error. AC mode on a
    model without `<AC>` adds the token with the mean embedding: an untrained anchor,
    meaningful only as a "before anchor training" baseline.
    """
    scheme, cfg, params = prepare_model(
        cfg, params, tokenizer, layout="scan", mesh=mesh, mode=anchor_mode, tokens=anchors
    )
    if need_anchors and not scheme.ids:
        raise ValueError(
            "--cache anchor (and --budget match-anchor) needs anchor settings, and the model has none: "
            "pass --anchor-mode ep (or ac), or evaluate with --cache full"
        )
    return ScoringModel(cfg=cfg, params=params, tokenizer=tokenizer, name=name, scheme=scheme, mesh=mesh)


def sepllm_model(model: ScoringModel, sep: SepLLM) -> ScoringModel:
    """The same weights under training-free SepLLM's scheme (`anjax.inference.policies.SepLLM`): its anchor cache
    is SepLLM's cache. The text is read as it is, so a scheme that inserts `<AC>` is refused."""
    if model.anchor_mode == "ac":
        raise ValueError(
            "sepllm reads the text as it is, but this model's anchor scheme (ac) inserts <AC>: "
            "evaluate sepllm with --anchor-mode ep"
        )
    names, ids = resolve_anchor_ids(model.tokenizer, "ep", sep.separators)
    scheme = model.scheme.replace(mode="ep", tokens=names, ids=ids, window=sep.window, rule="sepllm")
    cfg = model.cfg.replace(**scheme.config_fields())
    return dataclasses.replace(model, cfg=cfg, scheme=scheme, sink_tokens=sep.sink)


def load_scoring_model(
    model: str | None = None, dtype: str | None = None, mesh: dict[str, int] | None = None, **kwargs
) -> ScoringModel:
    """`scoring_model` for any model argument of `anjax.io.loading.load_model` (None: embedded SmolLM2), its
    parameters and compute in `dtype` (None: the model's; log-probabilities are taken from float32 logits), over
    the mesh of `mesh` {"data": D, "tensor": T} (`placement.inference_mesh`; None: one device)."""
    cfg, params, tokenizer = load_model(model, dtype)
    kwargs["mesh"] = placement.inference_mesh(cfg, **(mesh or {}))
    if tokenizer is None:
        raise ValueError(f"{model}: the model directory has no tokenizer files; scoring needs text")
    path = Path(str(model))
    name = "SmolLM2-135M-Instruct" if model is None else path.name if path.name != "hf" else f"{path.parent.name}/hf"
    return scoring_model(cfg, params, tokenizer, name=kwargs.pop("name", name), **kwargs)


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class ScoreRequest:
    """An item: choice i scores `continuations[i]` after `prefix + tails[i]` (ids)."""

    prefix: tuple[int, ...]
    tails: tuple[tuple[int, ...], ...]
    continuations: tuple[tuple[int, ...], ...]

    @classmethod
    def from_ids(cls, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> ScoreRequest:
        contexts = [tuple(c) for c, _ in pairs]
        n = 0
        while all(len(c) > n for c in contexts) and len({c[n] for c in contexts}) == 1:
            n += 1
        if any(not t for _, t in pairs):
            raise ValueError("a continuation encodes to no tokens")
        return cls(contexts[0][:n], tuple(c[n:] for c in contexts), tuple(tuple(t) for _, t in pairs))

    def chunks(self) -> list[tuple[int, ...]]:
        """Per choice: the fed tokens after the prefilled `prefix[:-1]` (the last one is not fed)."""
        return [self.prefix[-1:] + tl + ct for tl, ct in zip(self.tails, self.continuations)]

    @property
    def k(self) -> int:
        return len(self.continuations)


@dataclasses.dataclass
class PathResult:
    """One scoring path over a list of requests."""

    loglik: list[list[float]]  # per item, per choice
    greedy: list[list[bool]]  # the continuation is the argmax at every token
    held_slots: list[int]  # per item: cache slots after the prefix prefill
    prefix_slots: list[int]  # per item: prefilled prefix tokens (= what a full cache holds)
    seconds: float  # wall time of the device work, compilation excluded (a shared prefill counts in full)
    tokens: int  # tokens the path fed through the model (padding excluded)


def kept_bound(ids: Sequence[int], anchor_ids: Sequence[int], window: int = 0) -> int:
    """Most slots an anchor cache keeps between chunks while `ids` are prefilled: every anchor plus
    the longest sentence (its tokens before the anchor) plus, with a window of n, n slots. A full cache
    keeps len(ids)."""
    anchors, run, longest = 0, 0, 0
    for t in ids:
        if t in anchor_ids:
            anchors, run = anchors + 1, 0
        else:
            run += 1
            longest = max(longest, run)
    return anchors + longest + window


def anchor_kept(ids: Sequence[int], anchor_ids: Sequence[int], window: int = 0) -> int:
    """Slots an anchor cache holds after `ids` are prefilled: every anchor, the open sentence and, with a
    window of n, the other ones of the last n - 1 ids (what the next token's window reaches;
    `anjax.core.cache.keep_slots`)."""
    last = max((i for i, t in enumerate(ids) if t in anchor_ids), default=-1)
    n = len(ids)
    return sum(t in anchor_ids or i > last or i > n - window for i, t in enumerate(ids))


# ----------------------------------------------------------------------------- jitted steps


def _token_logprobs(logits_NxWxV, targets_NxW, scored_NxW) -> tuple[jax.Array, jax.Array]:
    """(sum of log p(target) over scored positions [N], every scored target is the argmax [N])."""
    logp_NxW = jnp.take_along_axis(logits_NxWxV, targets_NxW[..., None], -1)[..., 0] - jax.nn.logsumexp(
        logits_NxWxV, axis=-1
    )
    greedy_NxW = jnp.argmax(logits_NxWxV, axis=-1) == targets_NxW
    return jnp.where(scored_NxW, logp_NxW, 0.0).sum(-1), jnp.all(greedy_NxW | ~scored_NxW, -1)


def _broadcast(state: GenState, slots: int, k: int) -> GenState:
    """Cut (or zero-pad) each row's cache to `slots` slots and repeat every row k times (rows b*k .. b*k+k-1)."""

    def fit(x, axis, batch_axis):  # axis: the slot axis
        have = x.shape[axis]
        x = jax.lax.slice_in_dim(x, 0, min(have, slots), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, max(slots - have, 0))
        return jnp.repeat(jnp.pad(x, pad), k, axis=batch_axis)

    c = state.cache
    cache = c.map_slots(lambda kv: fit(kv, 3, 1), lambda meta: fit(meta, 1, 0)).replace(length=jnp.repeat(c.length, k))
    rep = lambda x: jnp.repeat(x, k, axis=0)
    return jax.tree.map(rep, state.replace(cache=None)).replace(cache=cache)


def _score_choices(cfg, spec, slots, k, params, state, tokens_NxW, valid_NxW, targets_NxW, scored_NxW):
    """Each item's K choice chunks [B*K, W] against its cache cut to `slots` (+ W for the chunk)."""
    state = _broadcast(state, slots + tokens_NxW.shape[1], k)
    logits, _ = prefill_step(cfg, spec, params, state, tokens_NxW, valid_NxW)
    return _token_logprobs(logits, targets_NxW, scored_NxW)


def _recompute(cfg, spec, params, tokens_NxL, valid_NxL, targets_NxW, scored_NxW):
    """One forward of every whole row [N, L] (right-aligned), no cache; scores the last W positions.

    The vocabulary projection is applied to those W positions only (the model's own
    all-position logits are dropped, so XLA never computes them), as in the cached path.
    """
    meta = token_metadata(tokens_NxL, valid_NxL, None, anchor_ids=spec.anchor_ids, sink_tokens=spec.sink_tokens)
    _, state = Llama(cfg).apply(
        {"params": params},
        tokens_NxL,
        meta,
        None,
        full_attention=not spec.anchor_cache,
        mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: mdl.name == "final_norm",
    )
    hidden_NxWxE = state["intermediates"]["final_norm"]["__call__"][0][:, -targets_NxW.shape[1] :]
    head_ExV = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    logits = jnp.einsum("bte,ev->btv", hidden_NxWxE, head_ExV.astype(cfg.dtype), preferred_element_type=jnp.float32)
    return _token_logprobs(logits, targets_NxW, scored_NxW)


def _nll_chunk(cfg, spec, params, state, tokens_BxT, valid_BxT, targets_BxT, scored_BxT):
    """Perplexity: append a chunk, return (state, -sum log p of scored targets [B], held slots [B])."""
    logits, state = prefill_step(cfg, spec, params, state, tokens_BxT, valid_BxT)
    logp, _ = _token_logprobs(logits, targets_BxT, scored_BxT)
    return state, -logp, state.cache.length


def _policy_nll_chunk(
    cfg, policy, params, state, mass_LxBxKxC, budget_B, tokens_BxT, valid_BxT, targets_BxT, scored_BxT
):
    """Perplexity under a policy: one streamed chunk (`policies.stream_step`) -> (state, mass, -sum log p of
    scored targets [B], held slots [B])."""
    logits, state, mass = policies.stream_step(
        cfg, policy, params, state, mass_LxBxKxC, budget_B, tokens_BxT, valid_BxT
    )
    logp, _ = _token_logprobs(logits, targets_BxT, scored_BxT)
    return state, mass, -logp, state.cache.length


# ----------------------------------------------------------------------------- host side


class BatchShapes(TypedDict):
    """The padded sizes of a `Scorer.run_paths` call, the same for every batch and path."""

    k: int  # choices per item
    chunk: int  # prefill chunk length
    capacity: dict[bool, int]  # context cache slots, by `EngineSpec.anchor_cache`
    width: int  # fed ids of a choice's chunk, bucketed


@dataclasses.dataclass
class SharedPrefills:
    """One batch's context prefills, each run once and shared by the paths that prefill alike (`Scorer.run_paths`):
    `prefill(spec, observers)` -> (state, masses) is called the first time a key (spec, observers) is asked for."""

    runtime: Runtime
    prefill: Callable[[EngineSpec, tuple[Policy, ...]], tuple[GenState, jax.Array | None]]
    done: dict = dataclasses.field(default_factory=dict)

    def get(self, spec: EngineSpec, observers: tuple[Policy, ...]) -> tuple[GenState, jax.Array | None, float]:
        """(state, masses, the prefill's seconds, compilation excluded): every path that shares it counts them."""
        key = (spec, observers)
        if key not in self.done:
            with self.runtime.timer() as timer:
                state, masses = self.prefill(spec, observers)
            self.done[key] = (state, masses, timer.seconds)
        return self.done[key]


class Scorer:
    """Batched scoring of `ScoreRequest`s; `batch_size` items per call (on a mesh: rounded up to a multiple of
    its data rows), prefill chunks <= `chunk_size`."""

    def __init__(self, model: ScoringModel, batch_size: int = 8, chunk_size: int = 128):
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
        batch_size = round_up(batch_size, placement.rows(model.mesh))
        self.model, self.batch_size, self.chunk_size = model, batch_size, chunk_size
        self.runtime = Runtime(model.mesh)

    @property
    def compile_seconds(self) -> float:
        return self.runtime.compile_seconds

    def spec(self, cache: str) -> EngineSpec:
        if cache not in CACHE_KINDS:
            raise ValueError(f"cache must be one of {CACHE_KINDS}, got {cache!r}")
        if cache == "anchor" and not self.model.anchor_ids:
            raise ValueError("an anchor cache needs anchor ids (scoring_model(anchor_mode=...))")
        return EngineSpec(
            anchor_cache=cache == "anchor", anchor_ids=self.model.anchor_ids, sink_tokens=self.model.sink_tokens
        )

    def run(self, requests: Sequence[ScoreRequest], cache: str, recompute: bool = False) -> PathResult:
        """Score every choice of every request with one path (see `run_paths`)."""
        return self.run_paths(requests, [(cache, recompute)])[0]

    def run_paths(
        self,
        requests: Sequence[ScoreRequest],
        paths: Sequence[tuple[str | Policy, bool | Sequence[int]]],
    ) -> list[PathResult]:
        """Score `requests` with each (cache, recompute) or (policy, budgets) path, interleaved batch by batch.

        A policy path (`anjax.inference.policies`) keeps budgets[i] slots per KV head for item i.
        Items are batched longest first (results come back in input order); every path
        sees the same batches and shapes, so their timed seconds compare fairly even on
        a machine whose load changes.

        Per batch, paths that prefill the context alike share one prefill (`SharedPrefills`): the
        full cache and `window` one plain full-cache prefill, `snapkv` and `h2o` one
        `policies.observe` that records the mass of every distinct `Policy.observer` at once; each
        path then selects (policies) and scores its choices. The results are those of each path
        run alone; so is each path's `seconds`: its own selection and scoring plus the time of the
        prefill it shares.
        """
        full = self.spec("full")
        specs = [(full, budgets) if isinstance(c, Policy) else (self.spec(c), budgets) for c, budgets in paths]
        for cache, budgets in paths:
            if isinstance(cache, Policy) and (isinstance(budgets, bool) or len(budgets) != len(requests)):
                raise ValueError(f"the {cache.kind} path needs one budget per request")
        if not requests:
            raise ValueError("nothing to score")
        n, B = len(requests), self.batch_size
        order = sorted(range(n), key=lambda i: -(len(requests[i].prefix) + max(map(len, requests[i].chunks()))))
        longest = max(len(r.prefix) for r in requests) - 1
        chunk = min(self.chunk_size, bucket(longest, 16))
        window = self.model.cfg.anchor_window
        bound = lambda ids: kept_bound(ids, self.model.anchor_ids, window) + self.model.sink_tokens  # noqa: E731
        anchor_bound = max(bound(r.prefix[:-1]) for r in requests)
        capacity = {False: round_up(max(longest, 1), chunk), True: round_up(max(anchor_bound, 1), chunk)}
        shapes = BatchShapes(
            k=max(r.k for r in requests),
            chunk=chunk,
            capacity=capacity,
            width=bucket(max(len(c) for r in requests for c in r.chunks()) - 1, 8),
        )
        k = shapes["k"]
        observers = tuple(dict.fromkeys(c.observer for c, _ in paths if isinstance(c, Policy) and c.observer))
        outs = [PathResult([[]] * n, [[]] * n, [0] * n, [0] * n, 0.0, 0) for _ in paths]
        for start in range(0, n, B):
            rows = order[start : start + B]
            batch = [requests[i] for i in rows] + [requests[rows[-1]]] * (B - len(rows))
            shared = SharedPrefills(self.runtime, functools.partial(self._prefill_batch, batch=batch, shapes=shapes))
            for (cache, how), (spec, _), out in zip(paths, specs, outs):
                if how is True:
                    with self.runtime.timer() as timer:
                        ll, greedy, held, fed = self._recompute_batch(spec, batch, shapes)
                    out.seconds += timer.seconds
                else:
                    observer = cache.observer if isinstance(cache, Policy) else None
                    state, masses, seconds = shared.get(spec, observers if observer else ())
                    with self.runtime.timer() as timer:
                        if isinstance(cache, Policy):
                            assert not isinstance(how, bool)  # a policy path has budgets (checked above)
                            state = self._select(cache, how, rows, state, masses, observers)
                        ll, greedy, held, fed = self._score_batch(spec, state, batch, shapes)
                    out.seconds += seconds + timer.seconds
                for j, i in enumerate(rows):
                    kk = requests[i].k
                    out.loglik[i] = ll[j * k : j * k + kk].tolist()
                    out.greedy[i] = greedy[j * k : j * k + kk].tolist()
                    out.held_slots[i] = int(held[j])
                    out.prefix_slots[i] = max(len(requests[i].prefix) - 1, 0)
                    out.tokens += fed[j]
        return outs

    def _select(
        self,
        policy: Policy,
        budgets: Sequence[int],
        rows: Sequence[int],
        state: GenState,
        masses: jax.Array | None,
        observers: tuple[Policy, ...],
    ) -> GenState:
        """A prefilled full cache cut to each item's budget by `policy` (`policies.select`), from the mass its
        observer recorded (`masses[i]` for `observers[i]`); the batch's padding rows repeat its last item."""
        B = self.batch_size
        budget_B = np.asarray([budgets[i] for i in rows] + [budgets[rows[-1]]] * (B - len(rows)))
        observer = policy.observer
        if observer:
            assert masses is not None  # recorded for every observer (`_prefill_batch`)
            mass = masses[observers.index(observer)]
        else:
            mass = jnp.zeros(state.cache.keys.shape[:4])
        state, _ = self.runtime.call(policies.select, (policy,), state, mass, budget_B.astype(np.int32))
        return state

    def _choice_arrays(
        self, batch: Sequence[ScoreRequest], k: int, width: int, align_right: bool, prefix: bool = False
    ):
        """(tokens, valid, targets, scored) [B*K, width] of each choice's fed ids (with the prefix if asked).

        Fed ids are `seq[:-1]`, targets `seq[1:]`, scored the last len(continuation) targets but `<AC>`. Items with
        fewer than K choices repeat their last choice (its result is dropped).
        """
        N, ac = len(batch) * k, self.model.ac_id
        arrays = [
            np.zeros((N, width), np.int32),
            np.zeros((N, width), bool),
            np.zeros((N, width), np.int32),
            np.zeros((N, width), bool),
        ]
        for j, r in enumerate(batch):
            for c in range(k):
                i = min(c, r.k - 1)
                seq = (r.prefix + r.tails[i] + r.continuations[i]) if prefix else r.chunks()[i]
                m = len(seq) - 1
                at = width - m if align_right else 0
                tokens, valid, targets, scored = (a[j * k + c] for a in arrays)
                tokens[at : at + m], valid[at : at + m], targets[at : at + m] = seq[:-1], True, seq[1:]
                scored[at + m - len(r.continuations[i]) : at + m] = [t != ac for t in r.continuations[i]]
        return arrays

    def _prefill_batch(
        self, spec: EngineSpec, observers: tuple[Policy, ...], batch, shapes: BatchShapes
    ) -> tuple[GenState, jax.Array | None]:
        """The batch's contexts prefilled with `spec`'s cache -> (state, masses), finished on device.

        With `observers` (a full cache), by `policies.observe`: masses [I, L, B, K, C + T] is the attention
        mass each observer records; else None.
        """
        m = self.model
        B, T = len(batch), shapes["chunk"]
        tokens, valid = right_align([r.prefix[:-1] for r in batch], T)
        capacity = shapes["capacity"][spec.anchor_cache]
        state = self.runtime.place_state(init_state(m.cfg, B, capacity + T, np.zeros(B, bool)))
        n_B = valid.sum(1).astype(np.int32)
        masses = None
        if observers:
            masses = jnp.zeros((len(observers), m.cfg.num_layers, B, m.cfg.num_kv_heads, capacity + T), jnp.float32)
        for c in range(0, tokens.shape[1], T):
            chunk = (tokens[:, c : c + T], valid[:, c : c + T])
            if observers:
                state, masses = self.runtime.call(
                    policies.observe, (m.cfg, observers), m.params, state, masses, *chunk, n_B
                )
            else:
                state = self.runtime.call(prefill, (m.cfg, spec), m.params, state, *chunk)
        if np.asarray(state.overflow)[:, 0].any():  # cannot happen with `kept_bound`; never truncate silently
            raise ValueError(f"a context needed more than the {capacity} cache slots reserved for it")
        return jax.block_until_ready((state, masses))

    def _score_batch(self, spec: EngineSpec, state: GenState, batch, shapes: BatchShapes):
        """Every choice of the batch against its prefilled (or selected) cache -> (loglik, greedy, held, fed)."""
        m, k = self.model, shapes["k"]
        held = np.asarray(state.cache.length)
        slots = min(bucket(int(held.max()), 16), state.cache.capacity)
        arrays = self._choice_arrays(batch, k, shapes["width"], align_right=False)
        ll, greedy = self.runtime.call(_score_choices, (m.cfg, spec, slots, k), m.params, state, *arrays)
        fed = [len(r.prefix) - 1 + sum(len(c) - 1 for c in r.chunks()) for r in batch]
        return np.asarray(ll), np.asarray(greedy), held, fed

    def _recompute_batch(self, spec, batch, shapes: BatchShapes):
        m = self.model
        k, W = shapes["k"], shapes["width"]
        longest = max(len(r.prefix) + len(t) + len(c) for r in batch for t, c in zip(r.tails, r.continuations))
        L = bucket(longest - 1, 32)
        tokens, valid, targets, scored = self._choice_arrays(batch, k, L, align_right=True, prefix=True)
        ll, greedy = self.runtime.call(
            _recompute, (m.cfg, spec), m.params, tokens, valid, targets[:, -W:], scored[:, -W:]
        )
        fed = [sum(len(r.prefix) + len(t) + len(c) - 1 for t, c in zip(r.tails, r.continuations)) for r in batch]
        return np.asarray(ll), np.asarray(greedy), np.zeros(len(batch), int), fed

    def sequence_nll(
        self,
        rows: Sequence[Sequence[int]],
        cache: str | Policy,
        scored: Sequence[Sequence[bool]] | None = None,
        budgets: Sequence[int] | None = None,
    ) -> dict:
        """Negative log-likelihood of each row's tokens given the ones before, through chunked prefill.

        rows: id lists (each >= 2 ids); scored[i][t]: token t of row i counts (default: all but the
        first). Chunks of `chunk_size`; a full or anchor cache can hold a whole row. A `Policy` keeps
        budgets[i] slots per layer and KV head for row i, streamed (`policies.stream_step`): each chunk
        attends to the kept slots and itself, then the cache is cut back to min(budget, held) (a cache of
        max budget + chunk slots). Returns lists over rows (`nll`, scored `tokens`, `held_slots` at the
        row's end) and the timed `seconds`.
        """
        policy = cache if isinstance(cache, Policy) else None
        if (budgets is not None) != (policy is not None) or (budgets is not None and len(budgets) != len(rows)):
            raise ValueError(
                "sequence_nll takes one budget per row with a policy, and none with a full or anchor cache"
            )
        spec = self.spec(cache if isinstance(cache, str) else "full")
        m, T, B = self.model, self.chunk_size, self.batch_size
        scored = scored or [[False] + [True] * (len(r) - 1) for r in rows]
        out = {"nll": [], "tokens": [], "held_slots": [], "seconds": 0.0}
        for start in range(0, len(rows), B):
            batch, marks = rows[start : start + B], scored[start : start + B]
            width = round_up(max(len(r) for r in batch) - 1, T)
            tokens, valid, targets, counted = (np.zeros((B, width), dt) for dt in (np.int32, bool, np.int32, bool))
            for b, (r, s) in enumerate(zip(batch, marks)):
                n = len(r) - 1
                tokens[b, :n], valid[b, :n], targets[b, :n], counted[b, :n] = r[:-1], True, r[1:], s[1:]
            slots, budget_B = width, np.ones(B, np.int32)  # a policy's cache: its largest budget + T slots
            if policy:
                assert budgets is not None  # one per row with a policy (checked above)
                budget_B[: len(batch)] = budgets[start : start + B]
                slots = min(bucket(int(max(min(b, len(r) - 1) for b, r in zip(budget_B, batch))), 16), width)
                mass = jnp.zeros((m.cfg.num_layers, B, m.cfg.num_kv_heads, slots + T), jnp.float32)
            state = self.runtime.place_state(init_state(m.cfg, B, slots + T, np.arange(B) >= len(batch)))
            nll_B = np.zeros(B)
            with self.runtime.timer() as timer:
                for c in range(0, width, T):
                    chunk = (tokens[:, c : c + T], valid[:, c : c + T], targets[:, c : c + T], counted[:, c : c + T])
                    if policy:
                        state, mass, part_B, held_B = self.runtime.call(
                            _policy_nll_chunk, (m.cfg, policy), m.params, state, mass, budget_B, *chunk
                        )
                    else:
                        state, part_B, held_B = self.runtime.call(_nll_chunk, (m.cfg, spec), m.params, state, *chunk)
                    nll_B += np.asarray(part_B)
            out["seconds"] += timer.seconds
            out["nll"] += nll_B[: len(batch)].tolist()
            out["tokens"] += [int(sum(s[1:])) for s in marks]
            out["held_slots"] += np.asarray(held_B)[: len(batch)].tolist()
        return out
