"""The inference engine: compacted-cache logits equal the full forward pass; compaction; compile counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_script, slow_case

from anjax.core.cache import compact, keep_slots
from anjax.core.config import tiny_config
from anjax.core.mask import token_metadata
from anjax.core.model import Llama, blocked_attention, init_params
from anjax.core.params import with_scan_layers
from anjax.inference.engine import CacheOverflowError, Engine, EngineConfig, span_flags
from anjax.inference.runtime import Runtime, right_align
from anjax.inference.sampling import sample_tokens
from anjax.inference.state import EngineSpec, init_state
from anjax.inference.steps import feed_token, prefill_step, start_decode

EP_IDS = (5, 7)  # two "punctuation" anchors
AC_ID = 255
MODELS = {
    "tiny": {},
    "gqa3_d64": dict(num_heads=6, num_kv_heads=3, head_dim=64),  # the second: SmolLM2's heads
    "sparse": dict(attention="sparse"),
}  # prefill chunks' self-attention through anjax.core.sparse_attention


RUNTIME = Runtime()  # one compile cache for the Engines of tests that do not count compiles


@functools.cache
def tiny_model(name: str = "tiny"):
    cfg = tiny_config(**MODELS[name])
    return cfg, init_params(cfg, jax.random.key(0))


def ep_row(rng, n):
    """Random ids with EP anchors: anchor first, consecutive anchors, long anchor-free runs."""
    ids = rng.integers(8, 250, n)
    ids[rng.random(n) < 0.2] = EP_IDS[0]
    ids[rng.random(n) < 0.05] = EP_IDS[1]
    ids[0] = EP_IDS[0] if n > 3 else ids[0]
    return ids.tolist()


def ac_row(rng, n):
    """Sentences of 1..7 ids, each closed by an <AC> id, cut to n ids (the last sentence stays open)."""
    out = []
    while len(out) < n:
        out += rng.integers(8, 250, rng.integers(1, 8)).tolist() + [AC_ID]
    return out[:n]


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _forward_logits(cfg, params, ids_1xW, anchor_ids, full, sink, valid_1xW, flags_1xW):
    meta = token_metadata(ids_1xW, valid_1xW, anchor_ids=anchor_ids, protected_BxT=flags_1xW, sink_tokens=sink)
    logits, _ = Llama(cfg).apply({"params": params}, ids_1xW, meta, full_attention=full)
    return logits[0]


def reference_logits(cfg, params, row, anchor_ids, full, sink=0, protected=None):
    """[T, V] logits of one full forward pass (AnSAN mask unless `full`; `protected` [T] bool), dense attention.

    Right-padded to a multiple of 64 (padding is invalid, so it changes nothing before it) to compile once."""
    T = len(row)
    width = -(-T // 64) * 64
    ids, valid = np.zeros((1, width), np.int32), np.arange(width)[None] < T
    ids[0, :T] = row
    flags = None
    if protected is not None:
        flags = np.zeros((1, width), bool)
        flags[0, :T] = protected
    logits = _forward_logits(cfg.replace(attention="dense"), params, ids, tuple(anchor_ids), full, sink, valid, flags)
    return np.asarray(logits)[:T]


_prefill = jax.jit(prefill_step, static_argnums=(0, 1))
_feed = jax.jit(feed_token, static_argnums=(0, 1))
_start = jax.jit(start_decode, static_argnums=(1, 2))


def engine_logits(cfg, params, spec, rows, n_prompt, chunk, capacity, protected=None):
    """Per row [len, V] logits: the first n_prompt[b] ids prefilled in chunks, the rest fed one by one.

    `protected`: per row, [len] bool flags (default none).
    """
    B = len(rows)
    protected = protected or [[False] * len(r) for r in rows]
    tokens, valid = right_align([r[:p] for r, p in zip(rows, n_prompt)], chunk)
    flags = right_align([f[:p] for f, p in zip(protected, n_prompt)], chunk)[0].astype(bool)
    state = init_state(cfg, B, capacity + chunk, np.zeros(B, bool))
    logits = [[] for _ in rows]
    for c in range(0, tokens.shape[1], chunk):
        lg, state = _prefill(
            cfg, spec, params, state, tokens[:, c : c + chunk], valid[:, c : c + chunk], flags[:, c : c + chunk]
        )
        lg = np.asarray(lg)
        for b in range(B):
            logits[b] += list(lg[b][valid[b, c : c + chunk]])
    state = _start(state, spec, capacity)
    for t in range(max(len(r) - p for r, p in zip(rows, n_prompt))):
        active = np.array([p + t < len(r) for r, p in zip(rows, n_prompt)])
        token = np.array([r[p + t] if a else 0 for r, p, a in zip(rows, n_prompt, active)], np.int32)
        token_flag = np.array([f[p + t] if a else False for f, p, a in zip(protected, n_prompt, active)], bool)
        state = state.replace(done=jnp.asarray(~active))
        lg, state = _feed(cfg, spec, params, state, token, token_flag)
        lg = np.asarray(lg)
        for b in np.flatnonzero(active):
            logits[b].append(lg[b])
    assert not np.asarray(state.overflow).any()
    return [np.stack(x) for x in logits], state


@pytest.mark.parametrize(
    "kind,chunk,model,batch",
    [  # the fast tier: EP with one-token chunks, AC with sparse prefill chunks (the rest: `slow`)
        ("ep", 1, "tiny", 3),
        slow_case("ep", 5, "tiny", 3),
        slow_case("ep", 16, "tiny", 3),
        slow_case("ac", 1, "tiny", 3),
        slow_case("ac", 5, "tiny", 3),
        slow_case("ac", 16, "tiny", 3),
        slow_case("ep", 7, "gqa3_d64", 1),
        slow_case("ac", 4, "gqa3_d64", 2),
        slow_case("ep", 16, "sparse", 3),
        ("ac", 5, "sparse", 3),
    ],
)
def test_anchor_cache_equals_full_forward_pass(kind, chunk, model, batch):
    cfg, params = tiny_model(model)
    rng = np.random.default_rng(chunk)
    make, ids = (ep_row, EP_IDS) if kind == "ep" else (ac_row, (AC_ID,))
    rows = [make(rng, n) for n in (37, 12, 1)][:batch]
    spec = EngineSpec(anchor_cache=True, anchor_ids=ids)
    got, state = engine_logits(cfg, params, spec, rows, [25, 4, 1][:batch], chunk, capacity=40)
    for b, row in enumerate(rows):
        want = reference_logits(cfg, params, row, ids, full=False)
        assert np.abs(got[b] - want).max() <= 1e-4, (b, np.abs(got[b] - want).max())
    # the decoded anchors really compacted the cache: fewer slots than tokens
    assert int(state.cache.length[0]) < len(rows[0])


def window_kept(row, anchor_ids, window, sink=0):
    """The positions a windowed anchor cache holds after `row`, from the rule's words: sinks, anchors, the open
    sentence (after the last anchor) and what the next token's window of n reaches, the last n - 1 positions."""
    last = max((t for t, x in enumerate(row) if x in anchor_ids), default=-1)
    n = len(row)
    return [t for t, x in enumerate(row) if t < sink or x in anchor_ids or t > last or t > n - window]


@pytest.mark.parametrize(
    "kind,rule,window,chunk,model",
    [  # the fast tier: one windowed AnSAN case (EP, sparse prefill chunks) and one SepLLM case (sinks)
        ("ep", "ansan", 7, 16, "sparse"),
        ("ep", "sepllm", 7, 5, "tiny"),
        slow_case("ep", "ansan", 1, 1, "tiny"),
        slow_case("ep", "ansan", 64, 5, "tiny"),
        slow_case("ac", "ansan", 1, 5, "tiny"),
        slow_case("ac", "ansan", 7, 16, "sparse"),
        slow_case("ac", "ansan", 64, 3, "tiny"),
        slow_case("ep", "sepllm", 0, 16, "sparse"),
        slow_case("ep", "sepllm", 1, 4, "tiny"),
        slow_case("ep", "sepllm", 64, 16, "sparse"),
        slow_case("ac", "sepllm", 7, 6, "gqa3_d64"),
    ],
)
def test_windowed_anchor_cache_equals_full_forward_pass(kind, rule, window, chunk, model):
    """A window of n and the anchor rule (SepLLM: sinks too): chunked prefill and decode of ragged rows give the
    logits of one forward pass under the predicate, and the cache holds exactly sinks + anchors + open sentence +
    the last n positions (decode evicts a slot as it leaves the window; a full buffer is compacted)."""
    base, params = tiny_model(model)
    cfg = base.replace(anchor_window=window, anchor_rule=rule)
    sink = 4 if rule == "sepllm" else 0
    rng = np.random.default_rng(window + chunk)
    make, ids = (ep_row, EP_IDS) if kind == "ep" else (ac_row, (AC_ID,))
    rows = [make(rng, n) for n in (75, 23, 1)]
    spec = EngineSpec(anchor_cache=True, anchor_ids=ids, sink_tokens=sink)
    got, state = engine_logits(cfg, params, spec, rows, [40, 9, 1], chunk, capacity=40 + window)
    for b, row in enumerate(rows):
        want = reference_logits(cfg, params, row, ids, full=False, sink=sink)
        assert np.abs(got[b] - want).max() <= 1e-4, (b, np.abs(got[b] - want).max())
        held = np.asarray(state.cache.valid[b])
        assert np.asarray(state.cache.pos[b])[held].tolist() == window_kept(row, ids, window, sink)
    if window > 1 or rule != "ansan":  # the rule changes the model's output (a window of 1 is the token itself)
        paper = reference_logits(base, params, rows[0], ids, full=False)
        assert np.abs(paper - reference_logits(cfg, params, rows[0], ids, False, sink)).max() > 1e-3


@pytest.mark.parametrize("chunk,model", [slow_case(3, "tiny"), (16, "tiny"), slow_case(16, "sparse")])
def test_full_cache_equals_causal_forward_pass(chunk, model):
    cfg, params = tiny_model(model)
    rng = np.random.default_rng(1)
    rows = [ep_row(rng, n) for n in (30, 9)]
    spec = EngineSpec(anchor_cache=False, anchor_ids=EP_IDS)
    got, state = engine_logits(cfg, params, spec, rows, [20, 2], chunk, capacity=32)
    for b, row in enumerate(rows):
        assert np.abs(got[b] - reference_logits(cfg, params, row, EP_IDS, full=True)).max() <= 1e-4
    assert state.cache.length.tolist() == [len(r) for r in rows]


def test_sink_tokens_stay_visible_and_exact():
    cfg, params = tiny_model()
    row = ep_row(np.random.default_rng(2), 30)
    spec = EngineSpec(anchor_cache=True, anchor_ids=EP_IDS, sink_tokens=3)
    got, state = engine_logits(cfg, params, spec, [row], [20], 7, capacity=32)
    assert np.abs(got[0] - reference_logits(cfg, params, row, EP_IDS, False, sink=3)).max() <= 1e-4
    assert np.asarray(state.cache.pos[0, :3]).tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind,chunk", [slow_case("ep", 1), ("ep", 6), slow_case("ac", 4), slow_case("ac", 16)])
def test_protected_spans_stay_visible_and_exact(kind, chunk):
    """Spans anywhere in the prompt (one inside its last, open sentence, so decode leaves holes)
    and in decoded tokens: logits equal one forward pass; the cache keeps exactly anchors +
    protected + open sentence."""
    cfg, params = tiny_model()
    rng = np.random.default_rng(chunk)
    make, ids = (ep_row, EP_IDS) if kind == "ep" else (ac_row, (AC_ID,))
    rows, n_prompt, flags = [], [], []
    for n, p in ((40, 28), (26, 9)):
        row = make(rng, n)
        while row[p - 1] in ids or row[p - 2] in ids or row[p - 3] in ids:  # the prompt ends in an open sentence
            row = make(rng, n)
        f = [False] * n
        start = int(rng.integers(0, p // 2))
        f[start : start + 4] = [True] * 4  # an early span
        f[p - 2] = True  # a span inside the open sentence (an unprotected token before it)
        f[p + 3] = True  # a decoded token
        rows.append(row), n_prompt.append(p), flags.append(f)
    spec = EngineSpec(anchor_cache=True, anchor_ids=ids)
    got, state = engine_logits(cfg, params, spec, rows, n_prompt, chunk, capacity=40, protected=flags)
    for b, row in enumerate(rows):
        want = reference_logits(cfg, params, row, ids, False, protected=flags[b])
        assert np.abs(got[b] - want).max() <= 1e-4, (b, np.abs(got[b] - want).max())
        plain = reference_logits(cfg, params, row, ids, False)
        assert np.abs(plain - want).max() > 1e-3  # the spans change the model's output
        meta = token_metadata(jnp.asarray([row]), jnp.ones((1, len(row)), bool), anchor_ids=ids)
        seg, anchor = np.asarray(meta.seg[0]), np.asarray(meta.anchor[0])
        kept = [t for t in range(len(row)) if anchor[t] or flags[b][t] or seg[t] == seg[-1] + anchor[-1]]
        c = state.cache
        held = np.asarray(c.valid[b])
        assert np.asarray(c.pos[b])[held].tolist() == kept
        assert np.asarray(c.protected[b])[held].tolist() == [flags[b][t] for t in kept]
    assert int(state.cache.length[0]) > int(state.cache.valid[0].sum())  # row 0 closed its sentence: holes


def test_ragged_rows_equal_rows_alone():
    cfg, params = tiny_model()
    rng = np.random.default_rng(3)
    rows = [ep_row(rng, n) for n in (26, 11, 18)]
    spec = EngineSpec(anchor_cache=True, anchor_ids=EP_IDS)
    together, _ = engine_logits(cfg, params, spec, rows, [20, 3, 18], 4, capacity=32)
    for b, row in enumerate(rows):
        alone, _ = engine_logits(cfg, params, spec, [row], [[20, 3, 18][b]], 4, capacity=32)
        np.testing.assert_allclose(together[b], alone[0], atol=1e-5)


def test_prefill_keeps_exactly_anchors_and_open_sentence():
    cfg, params = tiny_model()
    row = [9, 10, 5, 11, 12, 13, 7, 5, 14, 15, 16, 5, 17, 18]  # anchors at 2, 6, 7, 11; open sentence 12, 13
    spec = EngineSpec(anchor_cache=True, anchor_ids=EP_IDS)
    _, state = engine_logits(cfg, params, spec, [row], [len(row)], 4, capacity=16)
    n = int(state.cache.length[0])
    assert n == 6
    assert np.asarray(state.cache.pos[0, :n]).tolist() == [2, 6, 7, 11, 12, 13]
    assert np.asarray(state.cache.anchor[0, :n]).tolist() == [True] * 4 + [False] * 2
    assert np.asarray(state.cache.seg[0, :n]).tolist() == [0, 1, 2, 3, 4, 4]
    assert not np.asarray(state.cache.valid[0, n:]).any()
    assert not np.asarray(state.cache.keys[:, 0, :, n:]).any()  # freed slots are zeroed


def test_compact_is_stable_and_moves_kept_slots_to_front():
    cfg, _ = tiny_model()
    state = init_state(cfg, 2, 6, np.zeros(2, bool))
    cache = state.cache.replace(
        meta=state.cache.meta.replace(
            pos=jnp.array([[0, 1, 2, 3, 4, 5]] * 2),
            seg=jnp.array([[0, 0, 1, 1, 2, 2]] * 2),
            anchor=jnp.array([[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool),
            valid=jnp.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], bool),
        ),
        keys=jnp.arange(6.0)[None, None, None, :, None] * jnp.ones(cache_shape(cfg)),
        length=jnp.array([5, 6]),
    )
    out = compact(cache, keep_slots(cache, jnp.array([2, 1]), full=False))
    assert out.length.tolist() == [3, 2]
    assert np.asarray(out.pos).tolist() == [[1, 3, 4, 0, 0, 0], [2, 3, 0, 0, 0, 0]]
    assert np.asarray(out.keys[0, 0, 0, :, 0]).tolist() == [1, 3, 4, 0, 0, 0]
    full = compact(cache, keep_slots(cache, jnp.array([2, 1]), full=True))
    assert full.length.tolist() == [5, 5]


def cache_shape(cfg):
    return (cfg.num_layers, 2, cfg.num_kv_heads, 6, cfg.head_dim)


def test_reference_positions_rebase_to_slot_index():
    cfg, params = tiny_model()
    row = [9, 10, 5, 11, 12, 13, 7, 5, 14, 15, 16, 5, 17, 18, 5, 19]
    spec = EngineSpec(anchor_cache=True, anchor_ids=EP_IDS, reference_positions=True)
    got, state = engine_logits(cfg, params, spec, [row], [12], 4, capacity=16)
    n = int(state.cache.length[0])
    assert np.asarray(state.cache.pos[0, :n]).tolist() == list(range(n))
    exact = reference_logits(cfg, params, row, EP_IDS, full=False)
    assert np.abs(got[0][:3] - exact[:3]).max() <= 1e-4  # before the first compaction: identical
    assert np.abs(got[0] - exact).max() > 1e-3  # afterwards: the authors' positions differ


@pytest.mark.parametrize("batch,slots", [(1, 33), (1, 130), (2, 130)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (9, 3, 64)])
def test_one_query_attention_matches_numpy(batch, slots, heads, kv_heads, head_dim):
    """Decode's attention over head-major blocks (a cache and the new token), jitted, equals numpy.

    jaxlib 0.10.2's CPU YNN fusion miscomputes a multiply-reduce q.k at batch 1 and >= 33 slots.
    """
    rng = np.random.default_rng(slots)
    q = rng.standard_normal((batch, 1, heads, head_dim), np.float32)
    k, v = rng.standard_normal((2, batch, slots, kv_heads, head_dim), np.float32)
    allowed = rng.random((batch, 1, slots)) < 0.7
    allowed[..., 0] = True

    def attend(q, k, v, allowed):  # the cache, then its first slot again as the new token
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # head-major, as the cache stores them
        return blocked_attention(q, [(k, v, allowed), (k[:, :, :1], v[:, :, :1], allowed[..., :1])])

    got = jax.jit(attend)(q, k, v, allowed)
    keys, values = np.concatenate([k, k[:, :1]], 1), np.concatenate([v, v[:, :1]], 1)
    logits = np.einsum("bkgd,bskd->bkgs", q.reshape(batch, kv_heads, -1, head_dim), keys) / np.sqrt(head_dim)
    logits = np.where(np.concatenate([allowed, allowed[..., :1]], -1)[:, :, None], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    want = np.einsum("bkgs,bskd->bkgd", probs / probs.sum(-1, keepdims=True), values).reshape(q.shape)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT


def count_compiles(fn):
    events = []
    listener = lambda name, *_, **__: events.append(name) if name == COMPILE_EVENT else None
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events), result


def test_same_shapes_and_new_sampling_values_compile_once():
    cfg, params = tiny_model()
    eng = Engine(
        cfg.replace(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!")),
        params,
        config=EngineConfig(chunk_size=8, capacity=64, batch_size=2),
    )
    rng = np.random.default_rng(4)
    first, _ = count_compiles(lambda: eng.generate([ep_row(rng, 20), ep_row(rng, 9)], max_new_tokens=6))
    assert first > 0
    again, out = count_compiles(
        lambda: eng.generate(
            [ep_row(rng, 19), ep_row(rng, 14)], max_new_tokens=6, temperature=0.7, top_p=0.9, top_k=5, seed=3
        )
    )
    assert again == 0 and len(eng.runtime.executables) == 2
    assert [len(o.ids) - len(o.prompt_ids) for o in out] == [6, 6]


def test_greedy_generation_matches_argmax_of_full_forward():
    cfg, params = tiny_model()
    eng = Engine(
        cfg.replace(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!")),
        params,
        config=EngineConfig(chunk_size=4),
        runtime=RUNTIME,
    )
    rng = np.random.default_rng(5)
    prompts = [ep_row(rng, 13), ep_row(rng, 2)]
    for out in eng.generate(prompts, max_new_tokens=8, stop_ids=()):
        logits = reference_logits(cfg, params, out.ids[:-1], EP_IDS, full=False)
        assert out.ids[len(out.prompt_ids) :] == np.argmax(logits, -1)[len(out.prompt_ids) - 1 :].tolist()
        assert out.stats["generated_tokens"] == 8 and out.stats["full_cache_slots"] == len(out.ids) - 1


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("cache", ["anchor", "full"])
def test_split_decode_layers_equal_the_scanned_loop_and_the_full_forward(cache, scan_layers):
    """decode_layers="split" (unrolled layers, per-layer weights and cache buffers in the loop) generates the ids
    of "scan" and of the full forward's argmax, with the same cache statistics."""
    cfg, params = tiny_model()
    cfg = cfg.replace(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!"))
    cfg, params = with_scan_layers(cfg, params, scan_layers)
    rng = np.random.default_rng(11)
    prompts = [ep_row(rng, 17), ep_row(rng, 5)]
    outs = {}
    for layers in ("scan", "split"):
        eng = Engine(cfg, params, config=EngineConfig(cache=cache, chunk_size=4, decode_layers=layers), runtime=RUNTIME)
        assert eng.spec.split_layers == eng.cfg.fused_projections == (layers == "split")
        outs[layers] = eng.generate(prompts, max_new_tokens=9, stop_ids=())
    for scan_out, split_out in zip(outs["scan"], outs["split"]):
        assert split_out.ids == scan_out.ids
        assert split_out.stats["peak_cache_slots"] == scan_out.stats["peak_cache_slots"]
        logits = reference_logits(cfg, params, split_out.ids[:-1], EP_IDS, full=cache == "full")
        assert (
            split_out.ids[len(split_out.prompt_ids) :]
            == np.argmax(logits, -1)[len(split_out.prompt_ids) - 1 :].tolist()
        )
        pre = eng.prefill(prompts, 2, 4, 64)  # unrolled layers prefill into per-layer buffers: no slice copies
        assert isinstance(pre.state.cache.keys, tuple) == (layers == "split")
    with pytest.raises(ValueError, match="decode_layers"):
        EngineConfig(decode_layers="unrolled")
    with pytest.raises(ValueError, match="anchor and full caches"):
        EngineConfig(cache="h2o", budget=0.5, decode_layers="split")


def test_greedy_generation_with_protected_spans_matches_full_forward():
    cfg, params = tiny_model()
    eng = Engine(
        cfg.replace(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!")),
        params,
        config=EngineConfig(chunk_size=4),
        runtime=RUNTIME,
    )
    rng = np.random.default_rng(6)
    prompts, spans = [ep_row(rng, 15), ep_row(rng, 6)], [[(1, 4), (12, 15)], [(5, 6)]]
    for out, sp in zip(eng.generate(prompts, max_new_tokens=8, stop_ids=(), protect=spans), spans):
        flags = span_flags(len(out.ids) - 1, sp)
        logits = reference_logits(cfg, params, out.ids[:-1], EP_IDS, False, protected=flags)
        assert out.ids[len(out.prompt_ids) :] == np.argmax(logits, -1)[len(out.prompt_ids) - 1 :].tolist()
        assert out.stats["protected_tokens"] == sum(flags)
    for bad, message in (([[(3, 2)], []], "start < end"), ([[(0, 99)], []], "end <= 15"), ([[]], "one entry")):
        with pytest.raises(ValueError, match=message):
            eng.generate(prompts, max_new_tokens=2, protect=bad)
    with pytest.raises(ValueError, match="true positions"):
        Engine(eng.cfg, params, config=EngineConfig(positions="reference")).generate(
            prompts, max_new_tokens=2, protect=spans
        )


def test_stop_ids_end_rows_independently():
    cfg, params = tiny_model()
    eng = Engine(cfg, params, config=EngineConfig(chunk_size=4), runtime=RUNTIME)
    prompts = [[9, 10, 11], [12, 13, 14, 15, 16]]
    greedy = eng.generate(prompts, max_new_tokens=6, stop_ids=())
    first = greedy[0].ids[3]
    out = eng.generate(prompts, max_new_tokens=6, stop_ids=(first,))
    assert out[0].ids[3:] == [first]
    stops_b = first in greedy[1].ids[5:]
    assert out[1].ids[5:] == (greedy[1].ids[5 : greedy[1].ids.index(first, 5) + 1] if stops_b else greedy[1].ids[5:])


def test_sampling_filters():
    logits = jnp.array([[0.0, 3.0, 1.0, 2.0]] * 3)
    keys = jax.vmap(jax.random.key)(jnp.arange(3))
    greedy = sample_tokens(logits, keys, jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.ones(3))
    assert greedy.tolist() == [1, 1, 1]
    top1 = sample_tokens(logits, keys, jnp.full(3, 5.0), jnp.ones(3, jnp.int32), jnp.ones(3))
    assert top1.tolist() == [1, 1, 1]
    draws = jax.vmap(
        lambda k: sample_tokens(logits[:1], k[None], jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.full(1, 0.8))
    )(jax.random.split(jax.random.key(0), 200))
    assert set(np.asarray(draws).ravel().tolist()) == {1, 3}  # top-p 0.8 keeps the two likeliest ids


def test_capacity_overflow_names_the_row_and_sizes():
    cfg, params = tiny_model()
    # full cache: a 30-token prompt cannot fit
    eng = Engine(cfg, params, config=EngineConfig(chunk_size=4, capacity=10), runtime=RUNTIME)
    with pytest.raises(CacheOverflowError, match=r"prompt 1: .*need \d+ slots.*capacity is 10"):
        eng.generate([[9, 10], list(range(8, 38))], max_new_tokens=4)
    out = eng.generate([[9, 10], list(range(8, 38))], max_new_tokens=4, raise_errors=False)
    assert out[0].error is None and len(out[0].ids) == 6
    assert out[1].error and "capacity is 10" in out[1].error


def test_capacity_edge_and_peak_never_above_capacity():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt, new = list(range(8, 20)), 5
    need = len(prompt) + new - 1  # a full cache: every token fed (the last sampled one is not)
    for capacity, fails in ((need - 1, True), (need, False), (need + 1, False)):
        out = Engine(cfg, params, config=EngineConfig(cache="full", chunk_size=4, capacity=capacity)).generate(
            [prompt], max_new_tokens=new, stop_ids=(), raise_errors=False
        )[0]
        assert bool(out.error) == fails, (capacity, out.error)
        assert out.stats["peak_cache_slots"] <= capacity
        if not fails:
            assert out.stats["peak_cache_slots"] == need and len(out.ids) == len(prompt) + new
    with pytest.raises(CacheOverflowError, match=f"capacity is {need - 1}"):
        Engine(cfg, params, config=EngineConfig(cache="full", chunk_size=4, capacity=need - 1)).generate(
            [prompt], max_new_tokens=new, stop_ids=()
        )


def test_anchor_cache_fits_where_the_full_cache_cannot():
    cfg, params = tiny_model()
    cfg = cfg.replace(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!"))
    row = ([9, 10, 11, 5] * 12)[:-1]
    out = Engine(cfg, params, config=EngineConfig(chunk_size=8, capacity=24), runtime=RUNTIME).generate(
        [row], max_new_tokens=3, stop_ids=()
    )
    assert out[0].stats["peak_cache_slots"] <= 24 and out[0].stats["cache_reduction"] > 0.5
    with pytest.raises(CacheOverflowError):
        Engine(cfg, params, config=EngineConfig(chunk_size=8, capacity=24, cache="full")).generate(
            [row], max_new_tokens=3
        )


def test_bad_arguments_raise_value_errors():
    cfg, params = tiny_model()
    eng = Engine(cfg, params)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([[9]], max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        eng.generate([[9], []], max_new_tokens=1)
    with pytest.raises(ValueError, match="anchor settings"):
        Engine(cfg, params, config=EngineConfig(cache="anchor"))


@pytest.mark.parametrize("layers", ["scan", "split"])
def test_benchmarks_tile_copies_a_prefilled_row_in_either_cache_layout(layers):
    """`benchmarks/common.tile` (B copies of a one-row prefill, what the decode benchmarks time) decodes
    every copy as the one row, with a stacked and with a split (per-layer) cache."""
    bench = load_script("benchmarks/common.py")
    cfg, params = tiny_model()
    cfg = cfg.replace(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!"))
    eng = Engine(cfg, params, config=EngineConfig(chunk_size=4, decode_layers=layers), runtime=RUNTIME)
    pre = eng.prefill([ep_row(np.random.default_rng(12), 11)], 1, 4, 32)
    one = eng.decode(pre, 6)[0].ids
    assert [g.ids for g in eng.decode(bench.tile(pre, 3), 6)] == [one] * 3
