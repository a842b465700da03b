"""The AnSAN predicate against a brute-force reading of the paper, and its effect inside attention."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anjax.core.config import tiny_config
from anjax.core.mask import attention_allowed, token_metadata
from anjax.core.model import Llama, dot_attention, init_params

ANCHOR = 7  # the anchor token id in these tests


def brute_force_mask(ids, valid, doc, full, protected=None, sink=0, window=0, sepllm=False):
    """[T, T] from the paper's words, with explicit sentence lists (no seg counters).

    Documents are split into sentences, each ending at an anchor (tokens after the
    last anchor form the open sentence). A non-anchor token sees the earlier tokens
    of its own sentence and the anchors of all earlier sentences of its document; an
    anchor sees only its own sentence, itself included. Padding is never seen.
    Extensions: a protected token (flagged in `protected`, or among its document's
    first `sink` tokens) is seen by every later token of its document. With a window of
    n, every token also sees the n tokens of its document that end with itself (SepLLM's
    neighbours). SepLLM's rule (`sepllm`): an anchor also sees the anchors of all earlier
    sentences, as every other token does.
    """
    T = len(ids)
    allowed = np.zeros((T, T), bool)
    docs = {}
    for t in range(T):
        if valid[t]:
            docs.setdefault(doc[t], []).append(t)
    for members in docs.values():
        sentences, current = [], []
        for t in members:
            current.append(t)
            if ids[t] == ANCHOR:
                sentences.append(current)
                current = []
        if current:
            sentences.append(current)
        for si, sentence in enumerate(sentences):
            for q in sentence:
                earlier_anchors = [s[-1] for s in sentences[:si] if ids[s[-1]] == ANCHOR]
                if full:
                    visible = [k for k in members if k <= q]
                elif ids[q] == ANCHOR and not sepllm:
                    visible = [k for k in sentence if k <= q]
                else:
                    visible = earlier_anchors + [k for k in sentence if k <= q]
                visible += [
                    k
                    for i, k in enumerate(members)
                    if k <= q and ((protected is not None and protected[k]) or i < sink)
                ]
                at = members.index(q)
                visible += members[max(0, at - window + 1) : at + 1] if window else []
                allowed[q, visible] = True
    return allowed


def random_row(rng, T):
    kind = rng.integers(6)
    p_anchor = {0: 0.0, 1: 1.0}.get(kind, rng.uniform(0.05, 0.6))
    ids = np.where(rng.random(T) < p_anchor, ANCHOR, rng.integers(8, 50, T))
    if rng.random() < 0.3:
        ids[0] = ANCHOR
    if rng.random() < 0.3:
        ids[-1] = ANCHOR
    n_docs = rng.integers(1, 4)
    doc = np.sort(rng.integers(0, n_docs, T))
    valid = np.ones(T, bool)
    pad = rng.integers(0, T // 3 + 1)
    if rng.random() < 0.5:
        valid[:pad] = False  # left padding
    else:
        valid[T - pad :] = False  # right padding
    return ids, valid, doc


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))  # one compile per row length, not op by op
def allowed(ids, valid, doc, protected, sink, full, window=0, anchor_rule="ansan"):
    """[B, T, T] `attention_allowed` of rows with one anchor id, ANCHOR."""
    meta = token_metadata(ids, valid, doc, anchor_ids=(ANCHOR,), protected_BxT=protected, sink_tokens=sink)
    return attention_allowed(meta, meta, full, window, anchor_rule)


@pytest.mark.parametrize("full", [False, True])
def test_predicate_matches_brute_force(full):
    rng = np.random.default_rng(0)
    cases = 0
    for T in (1, 2, 5, 9, 16, 33):
        for _ in range(50):
            rows = [random_row(rng, T) for _ in range(2)]
            ids, valid, doc = (np.stack(x) for x in zip(*rows))
            got = np.asarray(allowed(ids, valid, doc, None, 0, full))
            for b in range(2):
                want = brute_force_mask(ids[b], valid[b], doc[b], full)
                q = valid[b]  # padding queries produce ignored outputs
                np.testing.assert_array_equal(got[b][q], want[q], err_msg=f"{ids[b]} {valid[b]} {doc[b]}")
                cases += 1
    assert cases >= 500


def test_protected_tokens_and_sinks_match_brute_force():
    rng = np.random.default_rng(1)
    for T in (1, 4, 9, 16, 33):
        for _ in range(40):
            rows = [random_row(rng, T) for _ in range(2)]
            ids, valid, doc = (np.stack(x) for x in zip(*rows))
            protected = rng.random(ids.shape) < rng.uniform(0, 0.4)
            sink = int(rng.integers(0, 4))
            got = np.asarray(allowed(ids, valid, doc, protected, sink, False))
            for b in range(2):
                want = brute_force_mask(ids[b], valid[b], doc[b], False, protected[b], sink)
                q = valid[b]
                np.testing.assert_array_equal(got[b][q], want[q], err_msg=f"{ids[b]} {protected[b]} {sink}")
    # protection reaches past sentence boundaries, where AnSAN alone would hide the token
    ids = jnp.array([[10, 11, ANCHOR, 12]])
    flags = jnp.array([[False, True, False, False]])
    meta = token_metadata(ids, jnp.ones_like(ids, bool), None, anchor_ids=(ANCHOR,), protected_BxT=flags)
    assert np.asarray(attention_allowed(meta, meta, False))[0, 3].tolist() == [False, True, True, True]


def test_window_and_sepllm_rule_match_brute_force():
    rng = np.random.default_rng(4)
    rules = [("ansan", 1), ("ansan", 7), ("ansan", 64), ("sepllm", 0), ("sepllm", 2)]  # (anchor rule, window)
    for (rule, window), T in itertools.product(rules, (9, 33)):
        for _ in range(25):
            rows = [random_row(rng, T) for _ in range(2)]
            ids, valid, doc = (np.stack(x) for x in zip(*rows))
            got = np.asarray(allowed(ids, valid, doc, None, 2, False, window, rule))
            for b in range(2):
                want = brute_force_mask(ids[b], valid[b], doc[b], False, None, 2, window, rule == "sepllm")
                q = valid[b]
                np.testing.assert_array_equal(got[b][q], want[q], err_msg=f"{ids[b]} {doc[b]} {rule} {window}")
    # the window reaches across a sentence boundary; sepllm lets an anchor see an earlier anchor
    ids = jnp.array([[10, ANCHOR, 11, 12, ANCHOR]])
    meta = token_metadata(ids, jnp.ones_like(ids, bool), None, anchor_ids=(ANCHOR,))
    assert np.asarray(attention_allowed(meta, meta, False, 3))[0, 3].tolist() == [False, True, True, True, False]
    sep = np.asarray(attention_allowed(meta, meta, False, anchor_rule="sepllm"))[0, 4]
    assert sep.tolist() == [False, True, True, True, True]


def test_metadata_hand_examples():
    # EP-style: "a b . c ! d" with anchors "." (7) and "!" (7), then padding.
    ids = jnp.array([[10, 11, 7, 12, 7, 13, 0, 0]])
    meta = token_metadata(ids, ids != 0, None, anchor_ids=(ANCHOR,))
    np.testing.assert_array_equal(meta.pos[0, :6], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(meta.seg[0, :6], [0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(meta.anchor[0], [0, 0, 1, 0, 1, 0, 0, 0])
    # two packed documents with left padding: positions and sentences restart per document
    ids = jnp.array([[0, 10, 7, 11, 12, 7, 13]])
    doc = jnp.array([[0, 0, 0, 0, 1, 1, 1]])
    meta = token_metadata(ids, ids != 0, doc, anchor_ids=(ANCHOR,))
    np.testing.assert_array_equal(meta.pos[0, 1:], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(meta.seg[0, 1:], [0, 0, 1, 0, 0, 1])


def test_perturbing_sentence_one_reaches_later_queries_only_through_its_anchor():
    """One attention call: sentence 1 = tokens 0..3 (anchor at 3), later sentences after."""
    ids = jnp.array([[10, 11, 12, 7, 13, 14, 7, 15, 16]])
    meta = token_metadata(ids, jnp.ones_like(ids, bool), None, anchor_ids=(ANCHOR,))
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(k1, (1, 9, 4, 8))
    k = jax.random.normal(k2, (1, 9, 2, 8))
    v = jax.random.normal(k3, (1, 9, 2, 8))
    later = slice(4, 9)

    def changed(index, full):
        base = dot_attention(q, k, v, attention_allowed(meta, meta, full))
        k_p = k.at[:, index].add(jax.random.normal(k4, (1, 2, 8)))
        v_p = v.at[:, index].add(1.0)
        out = dot_attention(q, k_p, v_p, attention_allowed(meta, meta, full))
        return np.abs(np.asarray(out - base))[0, later].max(axis=(1, 2))

    assert (changed(1, full=False) == 0).all()  # non-anchor of sentence 1: invisible later
    assert (changed(1, full=True) > 1e-3).all()  # ... but visible with full attention
    assert (changed(3, full=False)[[1, 3, 4]] > 1e-3).all()  # its anchor is visible to later non-anchors
    assert changed(3, full=False)[2] == 0  # ... but not to a later anchor (position 6)


@functools.partial(jax.jit, static_argnames="full")
def tiny_logits(params, ids_1xT, doc_1xT, full):
    """[1, T, V] logits of the tiny model over one unpadded row (`doc_1xT` None: one document)."""
    meta = token_metadata(ids_1xT, jnp.ones_like(ids_1xT, bool), doc_1xT, anchor_ids=(ANCHOR,))
    return Llama(tiny_config()).apply({"params": params}, ids_1xT, meta, full_attention=full)[0]


def test_documents_in_one_row_are_isolated():
    params = init_params(tiny_config(), jax.random.key(1))
    rng = np.random.default_rng(3)
    doc_a, doc_b = rng.integers(8, 200, 10), rng.integers(8, 200, 12)
    doc_b[[3, 8]] = ANCHOR
    doc = jnp.array([[0] * 10 + [1] * 12])

    def logits(tokens_a, full):
        return np.asarray(tiny_logits(params, jnp.asarray(np.concatenate([tokens_a, doc_b]))[None], doc, full))

    for full in (False, True):
        base = logits(doc_a, full)
        other = logits(rng.integers(8, 200, 10), full)
        np.testing.assert_array_equal(base[0, 10:], other[0, 10:])
        alone = np.asarray(tiny_logits(params, jnp.asarray(doc_b)[None], None, full))
        np.testing.assert_allclose(base[0, 10:], alone[0], atol=1e-5)
