"""The anchor scheme: which tokens are anchors, resolved in one place, saved with the model.

AnLLM-EP uses endpoint punctuation tokens as anchors (default ".", "?", "!"),
AnLLM-AC a new special token `<AC>` that the encoder (`anjax.text.encode`) puts after
every sentence. `AnchorScheme` is the whole agreement between training and use
(mode, anchor ids as they occur in running text, BOS rule, `max_sentence_tokens`,
sentence splitter, final-sentence rule, the attention window and anchor rule); it is stored in the model config
(`ModelConfig.scheme_fields`), hence in the run directory and the HF export, and
`resolve_scheme` is the one function that reads it back and applies overrides.
The mask itself lives in `anjax.core.mask`.

CLI, to see how a text is segmented:

    python -m anjax.anchors --mode ac --text "One. Two? Three"        # table
    python -m anjax.anchors --mode ep --anchors . '?' '!' , --text "One, two. Three" --json
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence

from anjax.core.config import AC_TOKEN, ANCHOR_MODES, ANCHOR_RULES, ModelConfig
from anjax.core.params import Params, init_embedding_row
from anjax.text import splitters

EP_DEFAULT_TOKENS = (".", "?", "!")
PROBE = "Word{0} Word"  # running text in which an EP anchor string is looked up


@dataclasses.dataclass(frozen=True)
class AnchorScheme:
    """Where anchors go: one frozen value shared by training, inference and evaluation.

    mode none | ep | ac; `tokens`/`ids` the anchor strings and the ids the tokenizer
    emits for them inside running text; `add_bos`/`bos_id` texts start with BOS;
    `max_sentence_tokens` (AC) an `<AC>` after every N tokens of a sentence, BOS not
    counted; `splitter` and `final_sentence` name the rules of `anjax.text.encode`; `window` (n neighbouring
    positions every query also sees; 0: the paper) and `rule` (ansan | sepllm: may anchors see earlier
    anchors) are `anjax.core.mask.attention_allowed`'s. Older run directories and exports lack the last two:
    they load as 0 and "ansan", the paper's mask.
    """

    mode: str = "none"
    tokens: tuple[str, ...] = ()
    ids: tuple[int, ...] = ()
    add_bos: bool = False
    bos_id: int | None = None
    max_sentence_tokens: int | None = None
    splitter: str = "pysbd-en"
    final_sentence: str = "terminated"
    window: int = 0
    rule: str = "ansan"

    def __post_init__(self):
        if self.mode not in ANCHOR_MODES:
            raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {self.mode!r}")
        if self.add_bos and self.bos_id is None:
            raise ValueError("add_bos is true but the tokenizer has no bos token")
        if self.max_sentence_tokens is not None and (self.mode != "ac" or self.max_sentence_tokens < 1):
            raise ValueError(
                f"max_sentence_tokens inserts <AC> tokens: it needs anchor mode 'ac' and a value >= 1, "
                f"got {self.max_sentence_tokens} in mode {self.mode!r}"
            )
        if self.window < 0 or self.rule not in ANCHOR_RULES:
            raise ValueError(
                f"need an anchor window >= 0 and a rule in {ANCHOR_RULES}, got {self.window}, {self.rule!r}"
            )
        if self.mode == "ac" and len(self.ids) != 1:
            raise ValueError("anchor mode 'ac' has exactly one anchor id, the <AC> token")
        if self.mode == "ac" or self.splitter not in splitters.PACKAGES:  # a package is needed where AC splits
            splitters.require(self.splitter)

    @property
    def ac_id(self) -> int | None:
        return self.ids[0] if self.mode == "ac" else None

    def config_fields(self) -> dict:
        """The `ModelConfig` fields that store this scheme."""
        return dict(
            anchor_mode=self.mode,
            anchor_tokens=self.tokens,
            anchor_ids=self.ids,
            add_bos=self.add_bos,
            max_sentence_tokens=self.max_sentence_tokens,
            sentence_splitter=self.splitter,
            final_sentence=self.final_sentence,
            anchor_window=self.window,
            anchor_rule=self.rule,
        )

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens": list(self.tokens), "ids": list(self.ids)}

    def replace(self, **changes) -> AnchorScheme:
        return dataclasses.replace(self, **changes)


def running_text_id(tokenizer, token: str) -> int:
    """The one id `tokenizer` emits for `token` inside running text (`PROBE`), else ValueError naming the pieces.

    SentencePiece (Llama 2) encodes a lone "." as "▁." but "Word." as "▁Word" "."; the anchor is the latter.
    """
    text = PROBE.format(token)
    start, end = PROBE.index("{0}"), PROBE.index("{0}") + len(token)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    hit = [(i, s, e) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]) if s < end and e > start]
    pieces = tokenizer.convert_ids_to_tokens([i for i, _, _ in hit])
    if len(hit) != 1 or hit[0][1] < start or hit[0][2] > end:
        raise ValueError(
            f"anchor {token!r} is not one token in running text: in {text!r} it is part of the pieces "
            f"{pieces} (ids {[i for i, _, _ in hit]}); choose strings that are one token each"
        )
    return int(hit[0][0])


def resolve_anchor_ids(tokenizer, mode: str, tokens=None) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(anchor token strings, their running-text ids) for `mode` none | ep | ac.

    ep: `tokens` (default ".", "?", "!"), each one running-text token (`running_text_id`).
    ac: the `<AC>` special token, which must already be in the vocabulary
        (`add_ac_token`); `tokens` must be None or (AC_TOKEN,).
    """
    if mode not in ANCHOR_MODES:
        raise ValueError(f"anchor mode must be one of {ANCHOR_MODES}, got {mode!r}")
    if mode == "none":
        return (), ()
    if mode == "ac":
        if tokens not in (None, (), [], (AC_TOKEN,), [AC_TOKEN]):
            raise ValueError(f"anchor mode 'ac' uses only {AC_TOKEN}, got anchor tokens {list(tokens)}")
        ac_id = tokenizer.convert_tokens_to_ids(AC_TOKEN)
        if AC_TOKEN not in tokenizer.get_vocab() or ac_id is None or ac_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {AC_TOKEN} token; add it with anjax.text.anchors.add_ac_token(tokenizer) "
                "and resize the embeddings with anjax.core.params.resize_embeddings"
            )
        return (AC_TOKEN,), (int(ac_id),)
    tokens = tuple(tokens) if tokens else EP_DEFAULT_TOKENS
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"anchor tokens repeat: {list(tokens)}")
    return tokens, tuple(running_text_id(tokenizer, t) for t in tokens)


def add_ac_token(tokenizer) -> int:
    """Add `<AC>` as an additional special token (idempotent); return its id.

    The vocabulary may grow by one: give the model a row for it (`resolve_scheme`
    with params, or anjax.core.params.init_embedding_row).
    """
    if AC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [AC_TOKEN]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(AC_TOKEN))


def tokenizer_adds_bos(tokenizer) -> bool:
    """The tokenizer's own convention: it prepends BOS when encoding with special tokens
    (Llama 2: yes; SmolLM2 / GPT-2 style: no). The BOS rule when none is recorded."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def make_scheme(
    tokenizer,
    mode: str,
    tokens: Sequence[str] | None = None,
    add_bos: bool | None = None,
    max_sentence_tokens: int | None = None,
    splitter: str = "pysbd-en",
) -> AnchorScheme:
    """A scheme for `tokenizer` from settings (AC: `<AC>` must be in it); add_bos None: the tokenizer's way."""
    names, ids = resolve_anchor_ids(tokenizer, mode, tokens)
    if add_bos and tokenizer.bos_token_id is None:
        raise ValueError("data.add_bos is true but the tokenizer has no bos token")
    return AnchorScheme(
        mode=mode,
        tokens=names,
        ids=ids,
        bos_id=tokenizer.bos_token_id,
        add_bos=tokenizer_adds_bos(tokenizer) if add_bos is None else bool(add_bos),
        max_sentence_tokens=max_sentence_tokens or None,
        splitter=splitter,
    )


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def resolve_scheme(
    cfg: ModelConfig,
    tokenizer=None,
    params: Params | None = None,
    *,
    mode: str | None = None,
    tokens: Sequence[str] | None = None,
    add_bos: bool | None = None,
    max_sentence_tokens: int | None = None,
    window: int | None = None,
    rule: str | None = None,
    splitter: str | None = None,
    ac_init: str = "mean",
    note: Callable[[str], None] = _note,
) -> tuple[AnchorScheme, ModelConfig, Params | None]:
    """THE place anchor settings are resolved: (scheme, cfg storing it, params) of a model.

    The model's stored scheme (`cfg`) applies; each argument that is not None overrides
    its part, and an override of a recorded, different value is reported through `note`
    (never silent). `tokens` without `mode` on a model without anchors means EP.
    AC on a model without `<AC>`: the token is added to `tokenizer` and, with `params`,
    its embedding row is initialised by `ac_init` (mean | copy of ".": `anjax.core.params.init_embedding_row`),
    also when the id falls inside padding rows of the embedding matrix.
    """
    stored = cfg.anchor_mode
    if mode is None and tokens and stored == "none":
        mode = "ep"
    new_mode = mode or stored
    if max_sentence_tokens and new_mode != "ac":
        raise ValueError(f"max_sentence_tokens inserts <AC> tokens and needs anchor mode 'ac', not {new_mode!r}")
    if mode is not None and mode != stored and stored != "none":
        note(f"anchor mode {mode!r} overrides the model's {stored!r}")
    keep_ids = new_mode == stored and tokens is None and bool(cfg.anchor_ids)
    if tokens is not None and stored == new_mode and tuple(tokens) != tuple(cfg.anchor_tokens) and cfg.anchor_tokens:
        note(f"anchors {list(tokens)} override the model's {list(cfg.anchor_tokens)}")
    if keep_ids:
        names, ids = tuple(cfg.anchor_tokens), tuple(cfg.anchor_ids)
    elif new_mode == "none":
        names, ids = (), ()
    else:
        if tokenizer is None:
            raise ValueError("anchor overrides need a tokenizer")
        if new_mode == "ac":
            had_ac = AC_TOKEN in tokenizer.get_vocab()
            ac_id = add_ac_token(tokenizer)
            if params is not None and (not had_ac or ac_id >= cfg.vocab_size):
                copy_from = running_text_id(tokenizer, ".") if ac_init == "copy" else None
                cfg, params = init_embedding_row(cfg, params, ac_id, ac_init, copy_from)
        names, ids = resolve_anchor_ids(tokenizer, new_mode, tokens)
    if bad := [i for i in ids if not 0 <= i < cfg.vocab_size]:
        raise ValueError(f"anchor ids {bad} are outside the model's vocabulary of {cfg.vocab_size}")
    for name, new, old in (
        ("add_bos", add_bos, cfg.add_bos),
        ("max_sentence_tokens", max_sentence_tokens, cfg.max_sentence_tokens),
        ("anchor window", window, cfg.anchor_window),
        ("anchor rule", rule, cfg.anchor_rule),
        ("sentence splitter", splitter, cfg.sentence_splitter if cfg.anchor_mode == "ac" else None),
    ):
        if new is not None and old is not None and new != old:
            note(f"{name}={new} overrides the model's {name}={old}")
    bos_rule = cfg.add_bos if add_bos is None else add_bos
    if bos_rule is None:
        bos_rule = tokenizer_adds_bos(tokenizer) if tokenizer is not None else False
    cap = cfg.max_sentence_tokens if max_sentence_tokens is None else (max_sentence_tokens or None)
    bos_id = tokenizer.bos_token_id if tokenizer is not None else cfg.bos_token_id
    scheme = AnchorScheme(
        mode=new_mode if ids else "none",
        tokens=names,
        ids=ids,
        add_bos=bool(bos_rule),
        bos_id=bos_id,
        max_sentence_tokens=cap if new_mode == "ac" else None,
        splitter=cfg.sentence_splitter if splitter is None else splitter,
        final_sentence=cfg.final_sentence,
        window=cfg.anchor_window if window is None else window,
        rule=cfg.anchor_rule if rule is None else rule,
    )
    return scheme, cfg.replace(**scheme.config_fields()), params
