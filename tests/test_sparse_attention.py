"""The block-sparse attention equals the dense predicate's softmax: outputs, gradients, model logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import slow_case

from anjax.core import flash_kernels as fk
from anjax.core import sparse_attention as sa
from anjax.core.config import tiny_config
from anjax.core.mask import attention_allowed, token_metadata
from anjax.core.model import Llama, blocked_attention, dot_attention, init_params
from anjax.train.trainer import loss_sums

ANCHOR = 7
B, H, K, D = 3, 4, 2, 16


def rows(kind: str, T: int, seed: int):
    """(ids, valid, doc, protected flags, sink_tokens) of B random rows of one layout `kind`."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, 50, (B, T))
    ids[rng.random((B, T)) < 0.15] = ANCHOR
    valid, doc, prot, sink = np.ones((B, T), bool), np.zeros((B, T), np.int32), np.zeros((B, T), bool), 0
    if kind == "anchor_first_last":
        ids[:, 0] = ids[:, -1] = ANCHOR
    elif kind == "consecutive":
        ids[:, 5:12] = ANCHOR
    elif kind == "no_anchor":
        ids[ids == ANCHOR] = 11
    elif kind == "long_sentence":  # one sentence spanning many tiles, then short ones
        ids[:, : T // 2] = 12
    elif kind == "documents":  # packed documents of varying length, right padding (doc -1)
        cuts = np.sort(rng.integers(1, T, (B, 3)), axis=1)
        doc = (np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(np.int32)
        valid = np.arange(T) < rng.integers(T // 2, T + 1, (B, 1))
        doc = np.where(valid, doc, -1)
    elif kind == "padding":  # left, right and inner padding
        valid[0, :9] = False
        valid[1, -13:] = False
        valid[2, 20:30] = False
    elif kind == "protected_sinks":
        prot = rng.random((B, T)) < 0.08
        sink = 3
    return ids, valid, doc, prot, sink


def setup(kind: str, T: int, seed: int = 0):
    ids, valid, doc, prot, sink = rows(kind, T, seed)
    meta = token_metadata(
        jnp.asarray(ids),
        jnp.asarray(valid),
        jnp.asarray(doc),
        anchor_ids=(ANCHOR,),
        protected_BxT=jnp.asarray(prot),
        sink_tokens=sink,
    )
    rng = np.random.default_rng(seed + 1)
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.float32) for _ in range(2))
    return meta, q, k, v


KINDS = [
    "random",
    "anchor_first_last",
    "consecutive",
    "no_anchor",
    "long_sentence",
    "documents",
    "padding",
    "protected_sinks",
]


WEIGHT_D = jnp.cos(jnp.arange(D, dtype=jnp.float32))


def dense(q, k, v, meta, full):
    return dot_attention(q, k, v, attention_allowed(meta, meta, full))


def sparse(q, k, v, meta, full):
    return sa.sparse_attention(q, k, v, meta, full, tile=16)


def loss(attend, q, k, v, meta, full):
    """A weighted sum of the outputs at valid queries (padding outputs are unspecified)."""
    return jnp.sum(jnp.where(meta.valid[..., None, None], attend(q, k, v, meta, full), 0.0) * WEIGHT_D)


# jitted once per `full`: every layout has the same shapes
_outputs = jax.jit(
    lambda q, k, v, meta, full: (dense(q, k, v, meta, full), sparse(q, k, v, meta, full)), static_argnums=4
)
_grads = jax.jit(
    lambda q, k, v, meta, full: [jax.grad(loss, argnums=(1, 2, 3))(f, q, k, v, meta, full) for f in (dense, sparse)],
    static_argnums=4,
)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_equal_dense(kind, full):
    meta, q, k, v = setup(kind, 77, seed=KINDS.index(kind))  # 77 tokens: not a multiple of the tile
    want, got = _outputs(q, k, v, meta, full)
    valid = np.asarray(meta.valid)
    assert np.abs(np.asarray(got - want))[valid].max() <= 1e-5
    assert np.isfinite(np.asarray(got)).all()
    grads_want, grads_got = _grads(q, k, v, meta, full)
    for g, w in zip(grads_got, grads_want):
        assert np.abs(np.asarray(g - w)).max() <= 1e-4


@pytest.mark.parametrize(
    "kind,window,rule",
    [("padding", 20, "ansan"), slow_case("documents", 1, "sepllm"), slow_case("protected_sinks", 40, "sepllm")],
)
def test_window_and_sepllm_rule_equal_dense_and_refuse_the_kernel(kind, window, rule):
    """A window (a band of key tiles reaching back past the sentence, across inner padding) and the sepllm rule:
    outputs and gradients equal the dense predicate's softmax; a kernel is refused (the tiled path runs)."""
    meta, q, k, v = setup(kind, 77, seed=KINDS.index(kind))
    kernel = fk.Kernel("gpu", interpret=True)
    attend = {
        "dense": lambda q, k, v, meta, full: dot_attention(q, k, v, attention_allowed(meta, meta, full, window, rule)),
        "sparse": lambda q, k, v, meta, full: sa.sparse_attention(
            q, k, v, meta, full, tile=16, kernel=kernel, window=window, anchor_rule=rule
        ),
    }
    run = jax.jit(
        lambda q, k, v, meta: [
            (f(q, k, v, meta, False), jax.grad(loss, (1, 2, 3))(f, q, k, v, meta, False)) for f in attend.values()
        ]
    )
    (want, grads_want), (got, grads_got) = run(q, k, v, meta)
    valid = np.asarray(meta.valid)
    assert np.abs(np.asarray(got - want))[valid].max() <= 1e-5
    for w, g in zip(grads_want, grads_got):
        assert np.abs(np.asarray(g - w)).max() <= 1e-4
    plain = dot_attention(q, k, v, attention_allowed(meta, meta, False))
    assert np.abs(np.asarray(plain - want))[valid].max() > 1e-3  # the rule changes the outputs


def same_run(m, b, i, j, full):
    return m.doc[b, j] == m.doc[b, i] and (full or m.seg[b, j] == m.seg[b, i])


@pytest.mark.parametrize("kind", ["documents", "padding", "long_sentence"])
def test_run_start_is_the_first_token_of_the_sentence(kind):
    """Brute force: the earliest j such that every valid token in [j, i] shares token i's (doc, seg)
    (document only, when `full`); a query tile of whole short sentences visits only its own key tile."""
    meta, _, _, _ = setup(kind, 77)
    m = jax.tree.map(np.asarray, meta)
    for full in (False, True):
        start = np.asarray(sa._run_start(meta, full))
        for b, i in zip(*np.nonzero(m.valid)):
            j = i
            while j > 0 and (not m.valid[b, j - 1] or same_run(m, b, i, j - 1, full)):
                j -= 1
            while not m.valid[b, j]:
                j += 1
            assert start[b, i] <= j and all(not m.valid[b, x] for x in range(start[b, i], j)), (b, i, full)
    ids = np.tile(np.array([12, 13, 14, ANCHOR]), (1, 32))
    meta = token_metadata(jnp.asarray(ids), jnp.ones(ids.shape, bool), anchor_ids=(ANCHOR,))
    first = np.asarray(sa._run_start(meta, False)[:, ::16].min(0) // 16)
    assert (first == np.arange(8)).all()


@pytest.mark.parametrize("full", [False, True])
def test_chunk_with_cache_block_equals_blocked_attention(full):
    """A prefill chunk: a dense cache block plus the chunk's own sparse self-attention, one softmax."""
    T, C = 40, 24
    meta, q, k, v = setup("protected_sinks", T, seed=5)
    rng = np.random.default_rng(6)
    ck, cv = (jnp.asarray(rng.standard_normal((B, K, C, D)), jnp.float32) for _ in range(2))
    cache_allowed = jnp.asarray(rng.random((B, T, C)) < 0.5)
    want = blocked_attention(
        q,
        [
            (ck, cv, cache_allowed),
            (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), attention_allowed(meta, meta, full)),
        ],
    )
    got = jax.jit(lambda q: sa.sparse_attention(q, k, v, meta, full, (ck, cv, cache_allowed), tile=8))(q)
    assert np.abs(np.asarray(got - want)).max() <= 1e-5


@pytest.mark.parametrize("full", [False, True])
def test_front_packed_cache_visits_only_the_slots_in_use(full):
    """A prefill chunk against a cache filled to different lengths per row (capacity 64, tiles of 8):
    equal to the dense block, and the key tiles visited end at the longest row's fill."""
    T, C = 24, 64
    meta, q, k, v = setup("padding", T, seed=7)
    rng = np.random.default_rng(8)
    ck, cv = (jnp.asarray(rng.standard_normal((B, K, C, D)), jnp.float32) for _ in range(2))
    length_B = np.array([19, 3, 0])
    cache_allowed = np.broadcast_to(np.arange(C) < length_B[:, None, None], (B, T, C)).copy()
    cache_allowed[0, :8, 12:] = False  # query tile 0 sees the first 12 slots of row 0 (tiles 0-1) at most
    cache_allowed = jnp.asarray(cache_allowed)
    want = blocked_attention(
        q,
        [
            (ck, cv, cache_allowed),
            (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), attention_allowed(meta, meta, full)),
        ],
    )
    got = jax.jit(lambda q: sa.sparse_attention(q, k, v, meta, full, (ck, cv, cache_allowed), tile=8, kernel=None))(q)
    valid = np.asarray(meta.valid)  # outputs at padding queries are unspecified
    assert np.abs(np.asarray(got - want)[valid]).max() <= 1e-5
    tk, first, stop = sa._cache_tiles(cache_allowed, 8, 8)
    assert tk == 8 and list(first) == [0, 0, 0] and list(stop) == [2, 3, 3]
    tk, first, stop = sa._cache_tiles(cache_allowed, 8, 4)  # key tiles of 4: they stop at the fill (19 -> 5)
    assert tk == 4 and list(first) == [0, 0, 0] and list(stop) == [3, 5, 5]
    tk, first, stop = sa._cache_tiles(jnp.zeros((1, 16, 40), bool), 16, 16)  # no key allowed; 40 = 8 x 5: one tile
    assert tk == 40 and list(first) == list(stop) == [0]


def test_key_tile_divides_the_query_tile():
    assert sa.key_tile(256, True) == 256  # full mode: the query tile
    assert [sa.key_tile(t, False) for t in (256, 64, 16, 8, 77, 3)] == [64, 16, 4, 2, 11, 1]


def test_use_sparse_by_config_and_length():
    assert not sa.use_sparse("dense", 8192)
    assert sa.use_sparse("sparse", 8) and not sa.use_sparse("sparse", 1)  # decode: one query row, dense
    assert sa.use_sparse("auto", sa.AUTO_MIN_LENGTH) and not sa.use_sparse("auto", sa.AUTO_MIN_LENGTH - 1)
    with pytest.raises(ValueError, match="attention must be"):
        tiny_config(attention="flash")


@pytest.mark.parametrize(
    "full,window,rule", [(False, 0, "ansan"), slow_case(True, 0, "ansan"), slow_case(False, 9, "sepllm")]
)
def test_model_logits_and_loss_gradients_sparse_equal_dense(full, window, rule, monkeypatch):
    """The model's training loss: the sparse path equals the dense one (the scheme's window and rule too)."""
    monkeypatch.setattr(sa, "TILE", 8)  # several tiles on a short row
    cfg = tiny_config(
        anchor_mode="ep", anchor_tokens=(".",), anchor_ids=(ANCHOR,), anchor_window=window, anchor_rule=rule
    )
    params = init_params(cfg, jax.random.key(0))
    ids, valid, doc, _, _ = rows("documents", 45, seed=3)
    batch = {
        "tokens": jnp.asarray(ids, jnp.int32),
        "valid": jnp.asarray(valid),
        "doc": jnp.asarray(doc),
        "labels": jnp.asarray(np.roll(ids, -1, 1), jnp.int32),
        "loss_mask": jnp.asarray(valid),
    }
    meta = token_metadata(batch["tokens"], batch["valid"], batch["doc"], anchor_ids=cfg.anchor_ids)

    @functools.partial(jax.jit, static_argnums=0)  # one compile per attention path, not op by op
    def logits_and_grads(c, params):
        logits = Llama(c).apply({"params": params}, batch["tokens"], meta, full_attention=full)[0]
        return logits, jax.grad(lambda p: loss_sums(c, p, batch, full)[0])(params)

    logits, grads = {}, {}
    for attention in ("dense", "sparse"):
        logits[attention], grads[attention] = logits_and_grads(cfg.replace(attention=attention), params)
        logits[attention] = np.asarray(logits[attention])
    np.testing.assert_allclose(logits["sparse"][valid], logits["dense"][valid], atol=1e-4)
    for g, w in zip(jax.tree.leaves(grads["sparse"]), jax.tree.leaves(grads["dense"])):
        np.testing.assert_allclose(g, w, atol=1e-4 * max(1.0, float(jnp.abs(w).max())))


def test_kernel_path_with_cache_block_equals_blocked_attention():
    """A prefill chunk on the kernel path: cache block + anchors (tiled) + band (kernel), one softmax (the kernels
    against the predicate at several blocks, dtypes and layouts: tests/test_flash_kernels.py)."""
    T, C = 40, 24
    meta, q, k, v = setup("protected_sinks", T, seed=5)
    rng = np.random.default_rng(6)
    ck, cv = (jnp.asarray(rng.standard_normal((B, K, C, D)), jnp.float32) for _ in range(2))
    cache_allowed = jnp.asarray(rng.random((B, T, C)) < 0.5)
    keys = [(ck, cv, cache_allowed), (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), None)]
    keys[1] = (*keys[1][:2], attention_allowed(meta, meta, False))
    want = blocked_attention(q, keys)
    got = sa.sparse_attention(q, k, v, meta, False, (ck, cv, cache_allowed), kernel=fk.Kernel("gpu", True))
    assert np.abs(np.asarray(got - want)).max() <= 1e-5


def test_kernel_is_opt_in_and_follows_the_platform(monkeypatch):
    """`auto` and `sparse` take the tiled path on every platform (until a device check passes on hardware);
    `kernel` takes the platform's Pallas kernel (GPU: Triton, TPU: Mosaic), `kernel:NAME` the named one, and
    a platform without a kernel is refused (traced only: no accelerator needed)."""
    assert fk.kernel_for_attention("auto", "gpu") is None and fk.kernel_for_attention("sparse", "tpu") is None
    assert fk.kernel_for_attention("kernel", "gpu") == fk.Kernel("gpu")
    assert fk.kernel_for_attention("kernel:tpu", "cpu") == fk.Kernel("tpu")
    assert fk.kernel_for_attention("kernel:gpu-interpret", "cpu") == fk.Kernel("gpu", interpret=True)
    with pytest.raises(ValueError, match="no Pallas kernel on platform 'cpu'"):
        fk.kernel_for_attention("kernel", "cpu")
    cfg = tiny_config(anchor_mode="ep", anchor_tokens=(".",), anchor_ids=(ANCHOR,))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    ids = jnp.full((1, 8), 11, jnp.int32)
    meta = token_metadata(ids, jnp.ones(ids.shape, bool), anchor_ids=cfg.anchor_ids)

    def traced(platform, attention):
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
        model = Llama(cfg.replace(attention=attention))
        return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids, meta)[0])(params))

    assert "pallas_call" not in traced("gpu", "sparse")  # `auto` from 256 queries is `sparse` (use_sparse)
    assert "pallas_call" in traced("gpu", "kernel") and "pallas_call" in traced("tpu", "kernel")
