"""Per-token metadata and the one attention predicate (docs/DESIGN.md Invariant 1).

Every token carries `doc` (document id in its row), `pos` (true position in its
document, used by RoPE), `seg` (sentence index: +1 after each anchor), `anchor`,
`protected` and `valid`. Query q may attend to key k iff

    valid_k and doc_k == doc_q and pos_k <= pos_q and
    (full or seg_k == seg_q or (anchor_k and not anchor_q) or protected_k
     or pos_k > pos_q - window)

`protected` is an extension beyond the paper, False by default: a protected token
stays visible to every later token of its document, as in full attention, and an
anchor cache keeps it. It carries attention sinks (the first N positions) and
protected spans (e.g. a question or a translation source).

Two more extensions, stored with the model's anchor scheme (`ModelConfig.anchor_window`,
`anchor_rule`): `window` n > 0 lets every query also see the keys of its last n positions
(SepLLM's neighbouring tokens; 0 is the paper), and `anchor_rule="sepllm"` lets every token,
anchors included, see earlier anchors (SepLLM's separators; "ansan", the paper: an anchor sees
only its own sentence). Both are static Python values (they shape the graph).

Training, prefill and decode all call `attention_allowed`; nothing else builds a mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp


class TokenMeta(flax.struct.PyTreeNode):
    """Metadata of a block of tokens; every field is [B, T]."""

    doc: jax.Array  # int32 document id within the row
    pos: jax.Array  # int32 true position within the document
    seg: jax.Array  # int32 sentence index within the document
    anchor: jax.Array  # bool, the token closes its sentence
    protected: jax.Array  # bool, visible to every later token of its document (extension)
    valid: jax.Array  # bool, not padding


def _restart_at_doc(count_BxT: jax.Array, doc_BxT: jax.Array) -> jax.Array:
    """Subtract from an exclusive running count its value at each document's first token."""
    T = doc_BxT.shape[1]
    idx_T = jnp.arange(T)
    starts_BxT = jnp.concatenate([jnp.ones_like(doc_BxT[:, :1], bool), doc_BxT[:, 1:] != doc_BxT[:, :-1]], axis=1)
    start_idx_BxT = jax.lax.cummax(jnp.where(starts_BxT, idx_T, 0), axis=1)
    return count_BxT - jnp.take_along_axis(count_BxT, start_idx_BxT, axis=1)


def is_anchor(ids_BxT: jax.Array, anchor_ids: Sequence[int]) -> jax.Array:
    """[B, T] bool: the token id is one of the anchor ids (none when the tuple is empty)."""
    if not anchor_ids:
        return jnp.zeros(ids_BxT.shape, bool)
    return jnp.isin(ids_BxT, jnp.asarray(tuple(anchor_ids), ids_BxT.dtype))


@jax.jit(static_argnames="anchor_ids")
def token_metadata(
    ids_BxT: jax.Array,
    valid_BxT: jax.Array,
    doc_BxT: jax.Array | None = None,
    anchor_ids: tuple[int, ...] = (),
    protected_BxT: jax.Array | None = None,
    sink_tokens: int | jax.Array = 0,
) -> TokenMeta:
    """Metadata for a batch of rows (left or right padding, several packed documents).

    Padding (valid=False) does not advance `pos` or `seg`; positions and sentence
    indices restart at 0 at each document's first token. Protected: the tokens
    flagged in `protected_BxT` and each document's first `sink_tokens` positions.
    """
    valid_BxT = valid_BxT.astype(bool)
    if doc_BxT is None:
        doc_BxT = jnp.zeros(ids_BxT.shape, jnp.int32)
    doc_BxT = doc_BxT.astype(jnp.int32)
    anchor_BxT = is_anchor(ids_BxT, anchor_ids) & valid_BxT
    v = valid_BxT.astype(jnp.int32)
    a = anchor_BxT.astype(jnp.int32)
    pos_BxT = _restart_at_doc(jnp.cumsum(v, axis=1) - v, doc_BxT)
    seg_BxT = _restart_at_doc(jnp.cumsum(a, axis=1) - a, doc_BxT)
    return TokenMeta(
        doc=doc_BxT,
        pos=pos_BxT,
        seg=seg_BxT,
        anchor=anchor_BxT,
        protected=protected_tokens(protected_BxT, pos_BxT, valid_BxT, sink_tokens),
        valid=valid_BxT,
    )


def protected_tokens(
    flags: jax.Array | None, pos: jax.Array, valid: jax.Array, sink_tokens: int | jax.Array = 0
) -> jax.Array:
    """The `protected` field (any shape, e.g. [B, T]): valid tokens that are flagged (None: none)
    or among their document's first `sink_tokens` positions."""
    sink = pos < sink_tokens
    return (sink if flags is None else flags.astype(bool) | sink) & valid


def attention_allowed(
    q: TokenMeta, k: TokenMeta, full: bool | jax.Array, window: int = 0, anchor_rule: str = "ansan"
) -> jax.Array:
    """[B, Tq, Tk] bool: the AnSAN predicate (or plain causal attention when `full`), with the last `window`
    positions and, under `anchor_rule="sepllm"`, earlier anchors visible to every query (module docstring)."""
    qe = lambda x: x[:, :, None]
    ke = lambda x: x[:, None, :]
    causal = ke(k.valid) & (ke(k.doc) == qe(q.doc)) & (ke(k.pos) <= qe(q.pos))
    same_sentence = ke(k.seg) == qe(q.seg)
    earlier_anchor = ke(k.anchor) if anchor_rule == "sepllm" else ke(k.anchor) & ~qe(q.anchor)
    visible = full | same_sentence | earlier_anchor | ke(k.protected)
    if window:
        visible |= in_window(q.pos, k.pos, window)
    return causal & visible


def in_window(q_pos: jax.Array, k_pos: jax.Array, window: int) -> jax.Array:
    """[B, Tq, Tk] bool: the key is one of the query's last `window` positions, itself included
    (pos_q - window < pos_k; causality and the document are `attention_allowed`'s)."""
    return k_pos[:, None, :] > q_pos[:, :, None] - window
