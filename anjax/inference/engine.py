"""The inference engine's host side: settings, batching, prompts and text; the device steps are `anjax.inference.steps`.

    from anjax.inference.engine import Engine
    eng = Engine.load()                          # embedded SmolLM2, or Engine.load("path/to/model")
    out = eng.generate(["The cat sat on the mat."], max_new_tokens=32)
    print(out[0].text, out[0].stats)

`Engine.generate` encodes the prompts, sorts them by length into batches of `batch_size`, prefills each
batch chunk by chunk (`Engine.prefill`: rows right-aligned, `anjax.inference.steps.prefill`) and decodes
it in one jitted loop (`Engine.decode`: `anjax.inference.steps.decode_loop`, ids picked by
`anjax.inference.sampling`). An anchor cache is exact (`anjax.inference.steps`: true positions);
`positions="reference"` reproduces the AnLLM authors' re-based positions, inexact, for comparison only.
The training-free cache policies (`EngineConfig(cache="window" | "snapkv" | "h2o", budget=...)`)
prefill with the full cache, cut it to the budget when decoding starts and evict as they decode
(`anjax.inference.policies`).

Capacity: `capacity` C bounds the slots a row keeps between steps (after compaction).
The buffers add room for the tokens in flight (C + T in prefill, C + 1 in decode), and
C shrinks to the bucket size (`anjax.inference.runtime.bucket`) that holds what the batch can need (few shapes compile;
decode reads every slot of its buffer). A row that would keep more than C
slots stops and `CacheOverflowError` names it and the sizes; nothing is truncated.
In AC mode `max_sentence_tokens=N` (default: the model's anchor scheme) forces an `<AC>`
after N tokens without one, counted like the encoder counts them (a leading BOS is not counted).
Extensions (off by default, beyond the paper), both through `protected` tokens
(`anjax.core.mask`), which stay visible to every later token and in the cache: `sink_tokens=N`
protects each row's first N tokens; `protect=` in `generate` protects spans of a prompt
(a question, a translation source). A span inside the prompt's last, open sentence
leaves holes in the decode cache when that sentence closes (`anjax.core.cache.close_sentence`);
`peak_cache_slots` counts them.

Static (recompile): model config, anchor ids, cache kind, positions, sinks, and the
shapes batch, chunk T, capacity and max_new_tokens. Arrays (never recompile): prompt
contents, temperature, top_k, top_p, seed, stop ids, max_sentence_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from anjax.core.config import ModelConfig, kv_bytes
from anjax.inference import placement, policies
from anjax.inference.model import prepare_model
from anjax.inference.policies import POLICIES, Policy
from anjax.inference.runtime import Runtime, bucket, right_align, round_up
from anjax.inference.sampling import Sampling, stop_id_array
from anjax.inference.state import EngineSpec, init_state
from anjax.inference.steps import Prefilled, decode_loop, prefill
from anjax.io.loading import load_model
from anjax.text.encode import Encoder

DEFAULT_ANCHOR_CAPACITY = 2048  # slots kept per row by default with an anchor cache
BUCKET_LOW = 128  # the smallest cache buffer (`anjax.inference.runtime.bucket`)


class CacheOverflowError(ValueError):
    """A row needs more cache slots than the capacity allows (message names row and sizes)."""


@dataclasses.dataclass
class Generation:
    """One request's result: ids (prompt and generated), printable text, stats, or an error.

    stats: prompt_tokens, generated_tokens; peak_cache_slots, the most slots the row kept
    between steps (after compaction; a prefill chunk adds up to T in flight); full_cache_slots,
    the tokens whose keys/values were computed (what a full cache holds at the end);
    cache_reduction = 1 - peak / full; prefill/decode tokens per second of the row over its
    batch's wall time (compilation excluded); the capacity and the decode buffer's size.
    Under a cache policy the peak counts from the prompt's compression (its prefill holds the
    whole prompt, as kvpress's presses do), and budget_slots is the row's budget.
    """

    prompt_ids: list[int]
    ids: list[int]
    text: str
    stats: dict[str, Any]
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """An engine's settings in one frozen value, checked when it is made (before any model loads).

    cache: "anchor" | "full" | None (anchor when the model has anchor settings), or a training-free
    policy "window" | "snapkv" | "h2o" (`anjax.inference.policies`; full attention over the slots it keeps)
    with `budget`: the slots each row keeps, an int >= 1, or a float in (0, 1], that fraction of each
    prompt's fed tokens (`policies.fraction_slots`); `policy_sink` / `policy_obs` / `policy_kernel`
    override the policy's settings (`Policy`).
    anchor_mode / anchors / max_sentence_tokens / anchor_window / anchor_rule: override the model's anchor scheme
    (`anjax.text.anchors.resolve_scheme`, which says so on stderr).
    capacity: slots a row may keep (default: the whole request for a full cache,
    min(that, DEFAULT_ANCHOR_CAPACITY + the scheme's window) for an anchor cache). chunk_size: prefill chunk T.
    positions: "true" | "reference" (the AnLLM authors' re-based positions, inexact).
    decode_layers: the decode loop's layers, "scan" (stacked weights and cache) or "split" (unrolled, per-layer
    weights and cache buffers; anchor and full caches; the engine then holds the weights per layer, with q/k/v and
    gate/up fused (`fuse_projections`), and prefills with them too); "auto": split on CPU, else scan (`decode_loop`).
    sink_tokens: keep each row's first N tokens visible (extension). raw_prompts: tokenize
    text prompts as they are (no <AC> inserted in AC mode). show_anchors: keep generated <AC>
    tokens in `text`.
    """

    cache: str | None = None
    anchor_mode: str | None = None
    anchors: tuple[str, ...] | None = None
    max_sentence_tokens: int | None = None
    anchor_window: int | None = None
    anchor_rule: str | None = None
    chunk_size: int = 512  # prefill: 512-token chunks ran 9-19% faster than 256 on CPU (README: Prefill)
    capacity: int | None = None
    batch_size: int = 8
    positions: str = "true"
    sink_tokens: int = 0
    raw_prompts: bool = False
    show_anchors: bool = False
    budget: int | float | None = None
    policy_sink: int | None = None
    policy_obs: int | None = None
    policy_kernel: int | None = None
    decode_layers: str = "auto"

    def __post_init__(self):
        if self.anchors is not None:
            object.__setattr__(self, "anchors", tuple(self.anchors))
        if self.cache not in (None, "anchor", "full", *POLICIES):
            raise ValueError(f"cache must be one of anchor, full, {', '.join(POLICIES)}; got {self.cache!r}")
        self.policy  # noqa: B018 -- checks the policy's settings and budget
        if self.decode_layers not in ("auto", "scan", "split"):
            raise ValueError(f"decode_layers must be 'auto', 'scan' or 'split', got {self.decode_layers!r}")
        if self.decode_layers == "split" and self.cache in POLICIES:
            raise ValueError(f"decode_layers='split' applies to the anchor and full caches, not {self.cache!r}")
        if self.positions not in ("true", "reference"):
            raise ValueError(f"positions must be 'true' or 'reference', got {self.positions!r}")
        for name, value, low in (
            ("chunk_size", self.chunk_size, 1),
            ("batch_size", self.batch_size, 1),
            ("capacity", 1 if self.capacity is None else self.capacity, 1),
            ("sink_tokens", self.sink_tokens, 0),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")

    @property
    def policy(self) -> Policy | None:
        """The cache policy (None for the anchor and full caches), its settings and budget checked."""
        settings = dict(sink=self.policy_sink, obs=self.policy_obs, kernel=self.policy_kernel)
        settings = {k: v for k, v in settings.items() if v is not None}
        if self.cache not in POLICIES:
            if self.budget is not None or settings:
                raise ValueError(f"budget and policy settings apply to the cache policies {', '.join(POLICIES)}")
            return None
        b = self.budget
        if isinstance(b, bool) or not ((isinstance(b, int) and b >= 1) or (isinstance(b, float) and 0 < b <= 1)):
            raise ValueError(
                f"cache {self.cache!r} needs a budget: slots (an int >= 1) or a fraction in (0, 1], got {b!r}"
            )
        if self.sink_tokens or self.positions != "true":
            raise ValueError(f"cache {self.cache!r} keeps slots by its own rule: no sink_tokens, true positions only")
        return Policy(self.cache, **settings)

    def row_budget(self, fed: int) -> int:
        """The slots a policy keeps of a prompt with `fed` tokens before its last."""
        assert self.budget is not None  # a cache policy has one (`policy`)
        return self.budget if isinstance(self.budget, int) else policies.fraction_slots(self.budget, fed)

    @classmethod
    def from_args(cls, args: Any) -> EngineConfig:
        """The config a command's flags give (`anjax.cli.add_engine_args` and the rest of `ARG_FIELDS`, read by
        their argparse names): one reading of each flag for infer.py, serve and the lm-eval adapter. A flag the
        command does not have, or leaves None, keeps the field's default."""
        given = {field: v for name, field in ARG_FIELDS.items() if (v := getattr(args, name, None)) is not None}
        return cls(**given)


# argparse name of a command's flag -> the `EngineConfig` field it sets (`EngineConfig.from_args`)
ARG_FIELDS = {
    "cache": "cache",
    "anchor_mode": "anchor_mode",
    "anchors": "anchors",
    "chunk_size": "chunk_size",
    "capacity": "capacity",
    "batch_size": "batch_size",
    "positions": "positions",
    "sink_tokens": "sink_tokens",
    "raw_prompt": "raw_prompts",
    "show_anchors": "show_anchors",
    "budget": "budget",
    "sink": "policy_sink",
    "obs": "policy_obs",
    "kernel": "policy_kernel",
}


class Engine:
    """Batched generation with an anchor, a full or a policy's cache (see the module docstring), set by an
    `EngineConfig`.

    `self.scheme` is the model's anchor scheme with the config's overrides applied.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params,
        tokenizer=None,
        config: EngineConfig = EngineConfig(),
        runtime: Runtime | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        """`runtime`: a compile cache to share (a `Scorer`'s over the same weights, and its mesh); default a new one.
        `mesh`: generate over a (data, tensor) mesh (`anjax.inference.placement`), rows over data, weights and KV
        heads over tensor; a batch is padded to a multiple of data rows."""
        c = config
        if runtime is not None and mesh is not None and mesh is not runtime.mesh:
            raise ValueError("give the mesh or a runtime (which holds its mesh), not both")
        self.runtime = Runtime(mesh) if runtime is None else runtime
        mesh = self.runtime.mesh
        tensor = 1 if mesh is None else mesh.shape["tensor"]
        if tensor > 1 and c.decode_layers == "split":
            raise ValueError(
                "decode_layers='split' fuses q/k/v and gate/up, which a tensor mesh cannot split: use scan"
            )
        split = c.decode_layers == "split" or (
            c.decode_layers == "auto" and c.policy is None and jax.default_backend() == "cpu" and tensor == 1
        )
        scheme, cfg, params = prepare_model(
            cfg,
            params,
            tokenizer,
            layout="split" if split else "scan",
            mesh=mesh,
            mode=c.anchor_mode,
            tokens=c.anchors,
            max_sentence_tokens=c.max_sentence_tokens,
            window=c.anchor_window,
            rule=c.anchor_rule,
        )
        if scheme.window and c.positions == "reference":
            raise ValueError("an anchor window counts true positions: use positions='true'")
        mode, anchor_ids = scheme.mode, scheme.ids
        cache = c.cache or ("anchor" if anchor_ids else "full")
        if cache == "anchor" and not anchor_ids:
            raise ValueError(
                "an anchor cache needs anchor settings: the model has none; pass anchor_mode='ep' "
                "(--anchor-mode ep) or use the full cache"
            )
        ac_id = anchor_ids[0] if mode == "ac" else -1
        self.cfg, self.tokenizer, self.anchor_mode, self.scheme, self.config = cfg, tokenizer, mode, scheme, c
        self.params = params
        self.spec = EngineSpec(
            anchor_cache=cache == "anchor",
            anchor_ids=tuple(anchor_ids),
            ac_id=ac_id,
            skip_bos=scheme.add_bos,
            sink_tokens=c.sink_tokens,
            reference_positions=c.positions == "reference",
            policy=c.policy,
            split_layers=split,
        )
        self.cache_kind, self.chunk_size, self.capacity, self.batch_size = cache, c.chunk_size, c.capacity, c.batch_size
        self.raw_prompts, self.show_anchors = c.raw_prompts, c.show_anchors

    @property
    def compile_seconds(self) -> float:
        return self.runtime.compile_seconds

    @classmethod
    def load(
        cls,
        model: str | None = None,
        config: EngineConfig = EngineConfig(),
        dtype: str | None = None,
        mesh: dict[str, int] | None = None,
    ) -> Engine:
        """An engine for any model argument of `anjax.io.loading.load_model` (None: the embedded SmolLM2), its
        parameters and compute in `dtype` (None: the model's; "bfloat16" halves the weights and the cache),
        over the mesh of `mesh` {"data": D, "tensor": T} (`placement.inference_mesh`; None: one device).

        Layers are loaded stacked (`scan_layers`: one layer body to compile), kept per layer when the decode
        is split (`EngineConfig.decode_layers`).
        """
        cfg, params, tokenizer = load_model(model, dtype, scan_layers=True)
        return cls(cfg, params, tokenizer, config, mesh=placement.inference_mesh(cfg, **(mesh or {})))

    # ------------------------------------------------------------------ prompts

    def encode(
        self, text: str, max_sentence_tokens: int | None = None, protect: Sequence[str] = ()
    ) -> tuple[list[int], list[bool]]:
        """Prompt ids anchored by the model's scheme (`anjax.text.encode.Encoder.prompt`: like training;
        the last sentence is closed iff the text ends one), and which of them `protect` covers.

        `max_sentence_tokens` (not None) overrides the scheme's for this prompt (0: off).
        `raw_prompts`: plain tokens (BOS by the scheme).
        """
        if not text.strip():
            raise ValueError("the prompt is empty")
        scheme = self.scheme
        if self.raw_prompts:
            scheme = scheme.replace(mode="none", tokens=(), ids=(), max_sentence_tokens=None)
        elif max_sentence_tokens is not None and scheme.mode == "ac":
            scheme = scheme.replace(max_sentence_tokens=max_sentence_tokens or None)
        return Encoder(self.tokenizer, scheme).prompt(text, protect)

    def decode_text(self, ids: Sequence[int], stop_ids: Sequence[int] = ()) -> str:
        """Printable text of generated ids: stop ids dropped, <AC> hidden unless `show_anchors`."""
        hidden = set(stop_ids) | ({self.spec.ac_id} if self.spec.ac_id >= 0 and not self.show_anchors else set())
        return self.tokenizer.decode([i for i in ids if i not in hidden]) if self.tokenizer else ""

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] | None = None,
        max_sentence_tokens: int | None = None,
        protect: Sequence[Sequence] | None = None,
        raise_errors: bool = True,
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Generate for text prompts or id lists, in batches of `batch_size` (order preserved).

        Greedy by default. `protect`, one entry per prompt: the parts that stay visible to
        every later token and in the cache (extension) — strings of a text prompt (every
        occurrence), or (start, end) token ranges of an id prompt.
        A request whose cache would overflow raises CacheOverflowError,
        or, with `raise_errors=False`, comes back with `error` set while the others are served.
        `progress(n)` is called after each batch with the number of requests it finished.
        """
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        if not 0.0 < top_p <= 1.0 or top_k < 0 or not 0 <= temperature < float("inf"):  # NaN fails too
            raise ValueError(
                f"need a finite temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got temperature={temperature}, "
                f"top_k={top_k}, top_p={top_p}"
            )
        if max_sentence_tokens and self.spec.ac_id < 0:
            raise ValueError("max_sentence_tokens forces <AC> tokens and needs anchor mode 'ac'")
        if max_sentence_tokens is None:
            max_sentence_tokens = self.scheme.max_sentence_tokens
        if not prompts:
            return []
        protect = protect or [()] * len(prompts)
        if len(protect) != len(prompts):
            raise ValueError(f"protect needs one entry per prompt: {len(protect)} for {len(prompts)} prompts")
        if self.spec.reference_positions and any(protect):
            raise ValueError("protected spans need true positions (positions='true')")
        if self.spec.policy and any(protect):
            raise ValueError(f"cache {self.cache_kind!r} keeps slots by its own rule: no protected spans")
        ids, flags = [], []
        for p, spans in zip(prompts, protect):
            row, row_flags = (
                self.encode(p, max_sentence_tokens, spans)
                if isinstance(p, str)
                else ([int(t) for t in p], span_flags(len(p), spans))
            )
            ids.append(row)
            flags.append(row_flags)
        for i, row in enumerate(ids):
            if not row:
                raise ValueError(f"prompt {i} is empty")
            if bad := [t for t in row if not 0 <= t < self.cfg.vocab_size]:
                raise ValueError(f"prompt {i} holds ids outside the vocabulary of {self.cfg.vocab_size}: {bad[:3]}")
        if stop_ids is None:
            stop_ids = () if self.cfg.eos_token_id is None else (self.cfg.eos_token_id,)
        stop_id_array(stop_ids)  # more than MAX_STOP_IDS: refused before any work
        results: dict[int, Generation] = {}
        positions = self.cfg.max_position_embeddings
        for i, row in enumerate(ids):  # sizes that cannot fit are refused before any work
            if len(row) + max_new_tokens > positions:
                error = (
                    f"{len(row)} prompt tokens + {max_new_tokens} new tokens exceed the model's {positions} "
                    "positions: shorten the prompt or lower --max-new-tokens"
                )
                if raise_errors:
                    raise ValueError(f"prompt {i}: {error}")
                results[i] = Generation(prompt_ids=row, ids=row, text="", stats={}, error=error)
        if len(results) == len(ids):
            return [results[i] for i in range(len(ids))]
        longest = max(len(r) for i, r in enumerate(ids) if i not in results)
        capacity = self.capacity or round_up(longest + max_new_tokens, 256)
        if self.capacity is None and self.spec.anchor_cache:  # anchors + open sentence, plus the window's slots
            capacity = min(capacity, DEFAULT_ANCHOR_CAPACITY + self.cfg.anchor_window)
        chunk = min(self.chunk_size, 1 << max(4, (longest - 1).bit_length()))
        decode = functools.partial(
            self.decode,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop_ids=tuple(stop_ids),
            max_sentence_tokens=max_sentence_tokens or 0,
        )
        order = sorted((i for i in range(len(ids)) if i not in results), key=lambda i: -len(ids[i]))  # by length
        step = min(self.batch_size, len(order))
        batch = round_up(step, placement.rows(self.runtime.mesh))  # dummy rows pad it to whole data shards
        for start in range(0, len(order), step):
            rows = order[start : start + step]
            pre = self.prefill([ids[i] for i in rows], batch, chunk, capacity, [flags[i] for i in rows])
            for i, g in zip(rows, decode(pre, max_new_tokens)):
                if g.error and raise_errors:
                    raise CacheOverflowError(f"prompt {i}: {g.error}")
                results[i] = g
            if progress:
                progress(len(rows))
        return [results[i] for i in range(len(ids))]

    def prefill(
        self,
        prompt_ids: list[list[int]],
        batch: int,
        chunk: int,
        capacity: int,
        protected: list[list[bool]] | None = None,
        chunks: int | None = None,
    ) -> Prefilled:
        """Prefill up to `batch` prompts (missing rows are dummies, done from the start).

        `protected`: per prompt and token (default none). The buffer has
        min(capacity, what the longest prompt can keep) + chunk slots. `chunks`: feed at most
        that many chunks (None: all); the rest wait in `left` for `prefill_more`.
        """
        n = len(prompt_ids)
        rows = [list(r) for r in prompt_ids] + [[0]] * (batch - n)
        flags = [list(map(bool, f)) for f in protected] if protected else [[False] * len(r) for r in prompt_ids]
        flags += [[False]] * (batch - n)
        tokens, valid = right_align([r[:-1] for r in rows], chunk)
        protected_BxW = right_align([f[:-1] for f in flags], chunk)[0].astype(bool)
        slots = min(capacity, bucket(max(len(r) for r in rows), BUCKET_LOW))
        left = [
            (tokens[:, c : c + chunk], valid[:, c : c + chunk], protected_BxW[:, c : c + chunk])
            for c in range(0, tokens.shape[1], chunk)
        ]
        # split: unrolled layers would copy their slice of a stacked cache for every chunk
        state = init_state(self.cfg, batch, slots + chunk, np.arange(batch) >= n, self.spec.split_layers)
        if self.spec.policy:
            c = self.cfg
            state = state.replace(
                budget=np.array([self.config.row_budget(len(r) - 1) for r in rows], np.int32),
                mass=np.zeros((c.num_layers, batch, c.num_kv_heads, slots + chunk), np.float32),
            )
        state = self.runtime.place_state(state)
        pre = Prefilled(state=state, rows=rows, protected=flags, n=n, capacity=capacity, seconds=0.0, left=left)
        return self.prefill_more(pre, chunks)

    def prefill_more(self, pre: Prefilled, chunks: int | None = 1) -> Prefilled:
        """Feed the next `chunks` chunks (None: all) of a partial prefill (`pre` is consumed)."""
        feed, state = pre.left[:chunks], pre.state
        fed_B = np.array([len(r) - 1 for r in pre.rows], np.int32)  # a policy observes the prompt's fed tokens
        with self.runtime.timer() as timer:
            for chunk_BxT in feed:
                if self.spec.policy:  # the whole prompt is held and observed; `start_decode` compresses it
                    step = (policies.prefill_chunk, (self.cfg, self.spec), self.params, state, *chunk_BxT[:2], fed_B)
                else:
                    step = (prefill, (self.cfg, self.spec), self.params, state, *chunk_BxT)
                state = self.runtime.call(*step, donate=(1,))
            jax.block_until_ready(state)
        return dataclasses.replace(pre, state=state, seconds=pre.seconds + timer.seconds, left=pre.left[len(feed) :])

    def decode(
        self,
        pre: Prefilled,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_ids: Sequence[int] = (),
        max_sentence_tokens: int = 0,
    ) -> list[Generation]:
        """Generate for the real rows of a prefilled batch; the decode buffer is sized to what they can need."""
        batch = len(pre.rows)
        held = np.asarray(pre.state.cache.length)[: pre.n]
        grows = max_new_tokens
        if self.spec.policy:  # it keeps its budget; `window` and `h2o` evict as they decode
            held = np.minimum(held, np.asarray(pre.state.budget)[: pre.n])
            grows = max_new_tokens if self.spec.policy.kind == "snapkv" else 0
        slots = min(pre.capacity, bucket(int(held.max()) + grows, BUCKET_LOW))
        samp = Sampling(
            temperature=np.full(batch, temperature, np.float32),
            top_k=np.full(batch, top_k, np.int32),
            top_p=np.full(batch, top_p, np.float32),
            seed=np.full(batch, seed, np.uint32),
            stop_ids=stop_id_array(stop_ids),
            max_sentence_tokens=np.array(max_sentence_tokens, np.int32),
        )
        last = np.array([r[-1] for r in pre.rows], np.int32)
        last_protected = np.array([f[-1] for f in pre.protected], bool)
        with self.runtime.timer() as timer:
            carry = self.runtime.call(
                decode_loop,
                (self.cfg, self.spec, slots, max_new_tokens),
                self.params,
                pre.state,
                last,
                last_protected,
                samp,
            )
            generated, out_ids = np.asarray(carry.generated), np.asarray(carry.tokens)
        decode_s = timer.seconds
        peak, overflow = np.asarray(carry.state.peak), np.asarray(carry.state.overflow)
        slot_bytes = kv_bytes(self.cfg, 1, 1)
        results = []
        for b, row in enumerate(pre.rows[: pre.n]):
            new = out_ids[b, : generated[b]].tolist()
            full = len(row) + len(new) - 1  # tokens whose keys/values were computed
            stats = dict(
                prompt_tokens=len(row),
                generated_tokens=len(new),
                protected_tokens=sum(pre.protected[b]),
                peak_cache_slots=int(peak[b]),
                full_cache_slots=full,
                cache_reduction=round(1 - int(peak[b]) / max(full, 1), 4),
                prefill_tokens_per_s=round((len(row) - 1) / max(pre.seconds, 1e-9), 1),
                decode_tokens_per_s=round(len(new) / max(decode_s, 1e-9), 1),
                prefill_s=round(pre.seconds, 4),
                decode_s=round(decode_s, 4),
                cache=self.cache_kind,
                **({"budget_slots": int(pre.state.policy_arrays()[0][b])} if self.spec.policy else {}),
                capacity=pre.capacity,
                decode_buffer_slots=slots + 1,
                decode_buffer_bytes=(slots + 1) * slot_bytes,
            )
            results.append(
                Generation(
                    prompt_ids=row,
                    ids=row + new,
                    text=self.decode_text(new, stop_ids),
                    stats=stats,
                    error=self.overflow_message(overflow[b], pre.capacity),
                )
            )
        return results

    def overflow_message(self, info: np.ndarray, capacity: int) -> str | None:
        """What a row's `GenState.overflow` [4] says, as the error a user reads (None: it did not overflow)."""
        need, anchors, open_len, protected = info.tolist()
        if not need:
            return None
        if self.spec.policy:
            return (
                f"the {self.cache_kind} cache's prefill holds the whole prompt, {need} slots, but the capacity "
                f"is {capacity}: raise --capacity"
            )
        if not self.spec.anchor_cache:
            return f"the full cache would need {need} slots but the capacity is {capacity}: raise --capacity"
        held = f"{anchors} anchors, " + (f"{protected} protected tokens, " if protected else "")
        if self.cfg.anchor_window:
            held += f"the last {self.cfg.anchor_window} positions (window), "
        return (
            f"the anchor cache would need {need} slots ({held}an open sentence of {open_len} tokens) "
            f"but the capacity is {capacity}: raise --capacity"
            + (" or set --max-sentence-tokens" if self.spec.ac_id >= 0 else "")
        )


def span_flags(n: int, spans: Sequence[Sequence[int]]) -> list[bool]:
    """[n] bool: token i lies in one of the (start, end) ranges (end exclusive; 0 <= start < end <= n)."""
    flags = [False] * n
    for span in spans:
        if (
            isinstance(span, str)
            or len(span) != 2
            or not all(isinstance(x, int) for x in span)
            or not 0 <= span[0] < span[1] <= n
        ):
            raise ValueError(f"a protected span must be (start, end) with 0 <= start < end <= {n}, got {span!r}")
        flags[span[0] : span[1]] = [True] * (span[1] - span[0])
    return flags
