"""Data pipeline: documents → sentences → anchors → token ids → fixed-shape batches.

    load_corpus      hub name or local json/jsonl/txt/parquet files, dirs, globs; or the embedded corpus
    encode_rows      documents → ids with the anchors of an `AnchorScheme` (`anjax.text.encode.Encoder`):
                     the one step used in memory (`tokenize_corpus`) and on disk (`anjax.train.prepare`)
    BatchIterator    deterministic, resumable global batches; each process reads its rows of them

A run reads a corpus prepared once on disk (`anjax.train.prepare`, `python -m anjax.prepare`);
`anjax.train.prepare.make_batches` turns a `DataConfig` into the `BatchIterator` of a split.

Every sequence of ids — training documents, SFT prompts and responses, and the
prompts of the inference engine — comes from `anjax.text.encode.Encoder`, so
training and inference insert anchors identically.

Batch (numpy; B = this process's rows of the global batch of batch_size rows, L = seq_len):

    tokens    [B, L] int32  input ids; 0 on padding
    doc       [B, L] int32  document index within the row (0, 1, ...); -1 on padding
    valid     [B, L] bool   not padding
    labels    [B, L] int32  labels[b, t] = the token that follows tokens[b, t] in the same
                            document (it may be the first token of the next row when a
                            packed document continues there); 0 where there is none
    loss_mask [B, L] bool   labels[b, t] is a target: valid, same document, not an SFT
                            prompt token, and not `<AC>` unless `ac_in_loss`

Rows: `packing=False` (the paper's choice) puts one document per row, right-
truncated to L (the rest of the document is dropped) and right-padded.
`packing=True` concatenates the shuffled documents into one stream and cuts it
into rows of L; a document that runs past a row continues at the start of the
next row as a new `doc` segment (its positions restart at 0 there, see
`anjax.core.mask.token_metadata`); documents never attend to each other.

SFT (`format=alpaca`): [BOS] + Alpaca prompt + response + EOS; only the
response and EOS are targets (`Encoder.alpaca`: the prompt is closed by an `<AC>`
in AC mode, as the engine closes the same prompt).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import itertools
import os
import re
import zlib
from typing import ClassVar, Protocol

import datasets
import numpy as np

from anjax.core.config import check_ranges
from anjax.text.anchors import AnchorScheme
from anjax.text.encode import Encoder


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The `data:` section of a run config."""

    path: str | None = None  # None: embedded corpus; a hub dataset name; or local files/dir/glob
    name: str | None = None  # hub dataset config name
    split: str = "train"  # training split; slicing works: "train[:99%]"
    eval_split: str | None = "validation"  # held out; for local files e.g. "train[99%:]"; None: no eval
    format: str = "text"  # text | alpaca (SFT: instruction, input, output)
    text_field: str = "text"  # column holding the text (format=text)
    text_sample_by: str = "document"  # .txt files: document | paragraph | line is one document
    seq_len: int = 1024  # L
    batch_size: int = 8  # global rows per step, all hosts together; each reads the rows its devices hold
    packing: bool = False  # False: one document per row (paper); True: concatenate and cut
    add_bos: bool | None = (
        None  # prepend BOS to each document; None: as the tokenizer itself does (saved in the scheme)
    )
    ac_in_loss: bool = True  # <AC> labels count in the loss
    max_sentence_tokens: int | None = (
        None  # AC: an extra <AC> after every N tokens of a long sentence (saved in the scheme)
    )
    shuffle: bool = True
    seed: int = 0
    num_proc: int | None = None  # processes preparing a corpus (anjax.train.prepare); null = all cores

    RANGES: ClassVar[dict[str, str]] = {  # anjax.core.config.check_ranges; data.seq_len <= the model's positions too
        "seq_len": "[2, inf)",
        "batch_size": "[1, inf)",
        "max_sentence_tokens": "[1, inf)",
        "seed": "[0, 4294967296)",
        "num_proc": "[1, inf)",
    }

    def __post_init__(self):
        if self.format not in ("text", "alpaca"):
            raise ValueError(f"data.format must be text|alpaca, got {self.format!r}")
        check_ranges(DataConfig, vars(self), "data.")


# ----------------------------------------------------------------------------- sources

_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".md": "text", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")


def _builder(path: str) -> str | None:
    stem = path[: -len(ext)] if (ext := os.path.splitext(path)[1]) in _COMPRESSED else path
    return _BUILDERS.get(os.path.splitext(stem)[1].lower())


def local_files(path: str) -> list[str] | None:
    """The data files that `path` names, or None when it is not a local path (a hub name)."""
    path = os.path.expanduser(path)
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise ValueError(f"no files match {path!r}")
    elif os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if _builder(f))
        if not files:
            raise ValueError(f"directory {path!r} holds no {'/'.join(sorted(_BUILDERS))} files")
    elif os.path.isfile(path):
        files = [path]
    elif path.startswith(("/", ".", "~")) or _builder(path):
        raise ValueError(f"no such file or directory: {path!r}")
    else:
        return None
    builders = {_builder(f) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(
            f"{path!r}: need files of one kind (json/jsonl, txt, parquet), got {sorted(map(str, builders))}"
        )
    return files


def _first_non_utf8(files: list[str]) -> str | None:
    """'FILE is not UTF-8 text (...)' for the first uncompressed text/JSON file that does not decode, else None.

    Read in 16 MiB pieces: the JSON reader would otherwise accept invalid bytes silently.
    """
    import codecs

    for f in files:
        if _builder(f) not in ("text", "json") or os.path.splitext(f)[1] in _COMPRESSED:
            continue
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(f, "rb") as fh:
            while True:
                piece = fh.read(1 << 24)
                try:
                    decoder.decode(piece, final=not piece)
                except UnicodeDecodeError as e:
                    return f"{f} is not UTF-8 text (invalid byte near offset {offset + e.start}): convert it to UTF-8"
                if not piece:
                    break
                offset += len(piece)
    return None


def load_corpus(cfg: DataConfig, split: str | None = None) -> datasets.Dataset:
    """The raw documents of `split` (default `cfg.split`) as a datasets.Dataset."""
    split = split or cfg.split
    if cfg.path in (None, "", "embedded"):
        if cfg.format != "text":
            raise ValueError(
                "the embedded corpus is plain text: set data.path to an Alpaca json file for format=alpaca"
            )
        return embedded_corpus(split)
    path = os.path.expanduser(cfg.path)
    if any(os.path.exists(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")):
        saved = datasets.load_from_disk(path)  # a save_to_disk directory
        return saved[split] if isinstance(saved, datasets.DatasetDict) else saved
    files = local_files(path)
    if files and (bad := _first_non_utf8(files)):
        raise ValueError(bad)
    try:
        if files is None:
            return datasets.load_dataset(cfg.path, cfg.name, split=split)
        builder = _builder(files[0])
        if builder is None:  # local_files admits no such file
            raise ValueError(f"{files[0]!r} is none of {'/'.join(sorted(_BUILDERS))}")
        if builder == "json" and len(files) > 1:
            return _json_files(files, cfg, split)
        if builder == "text":
            return datasets.load_dataset(builder, data_files=files, split=split, sample_by=cfg.text_sample_by)
        return datasets.load_dataset(builder, data_files=files, split=split)
    except Exception as e:  # offline hub, unknown split, malformed file: say which source failed
        where = f"local files {cfg.path!r}" if files else f"hub dataset {cfg.path!r} (not a local path)"
        hint = " (local files have one split 'train'; use e.g. 'train[:99%]' and 'train[99%:]')" if files else ""
        raise ValueError(f"cannot load split {split!r} of {where}: {type(e).__name__}: {str(e)[:300]}{hint}") from None


def _json_files(files: list[str], cfg: DataConfig, split: str) -> datasets.Dataset:
    """Split `split` of several JSON files read one by one, keeping only the columns format `cfg.format`
    reads: other columns may differ between files (RedPajama's `meta` has one structure per source)."""
    keep = {"text": [cfg.text_field], "alpaca": ["instruction", "input", "output"]}[cfg.format]
    parts = []
    for f in files:
        part = datasets.load_dataset("json", data_files=[f], split="train")
        parts.append(part.select_columns([c for c in part.column_names if c in keep] or part.column_names))
    whole = datasets.concatenate_datasets(parts)
    ranges = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(whole)})
    if len(ranges) == 1:  # a contiguous range: no indices mapping
        return whole.select(range(ranges[0].from_, ranges[0].to))
    return whole.select([i for r in ranges for i in range(r.from_, r.to)])


def _heading(lines: list[str], i: int) -> bool:
    """lines[i] is a reST title: a text line underlined by a run of one of * = - ~ ^."""
    under = lines[i + 1] if i + 1 < len(lines) else ""
    return (
        bool(lines[i].strip())
        and len(under) >= max(3, len(lines[i].rstrip()))
        and len(set(under)) == 1
        and under[0] in "*=-~^"
    )


def _unwrap(body: str) -> str:
    """Join hard-wrapped prose lines; paragraphs with indented, list or table lines stay as they are."""
    paragraphs = [p.strip("\n").rstrip() for p in re.split(r"\n[ \t]*\n", body) if p.strip()]
    prose = lambda p: not re.search(r"^(\s|[*\-] |\d+\. |[+|])", p, re.M)
    return "\n\n".join(" ".join(p.split("\n")) if prose(p) else p for p in paragraphs)


def _sections(topic: str) -> list[str]:
    """One document per section of a reST topic: its title(s) and unwrapped body."""
    lines, docs, titles, body = topic.split("\n"), [], [], []
    for i, line in enumerate(lines):
        if i > 0 and _heading(lines, i - 1):
            continue  # the underline
        if not _heading(lines, i):
            body.append(line)
            continue
        if text := _unwrap("\n".join(body)):
            docs.append("\n\n".join(titles + [text]))
            titles = []
        titles, body = titles + [line.strip()], []
    if text := _unwrap("\n".join(body)):
        docs.append("\n\n".join(titles + [text]))
    return docs


@functools.lru_cache(maxsize=2)
def _embedded_texts(split: str) -> tuple[str, ...]:
    import pydoc_data.topics

    sections = [doc for _, topic in sorted(pydoc_data.topics.topics.items()) for doc in _sections(topic)]
    held_out = lambda doc: zlib.crc32(doc.encode()) % 10 == 0
    return tuple(doc for doc in dict.fromkeys(sections) if held_out(doc) == (split == "validation"))


def embedded_corpus(split: str = "train") -> datasets.Dataset:
    """The default corpus, needing no download: CPython's documentation topics.

    Source: the stdlib module `pydoc_data.topics` (the language reference and
    built-in types). Each section is one document (hard-wrapped prose unwrapped,
    sections that several topics repeat kept once): ~52k words, ~80k SmolLM2 tokens.
    `validation` holds the sections whose crc32(text) % 10 == 0 (~11% of the
    text), `train` the rest. No benchmark text is in it.
    For more text set `data.path` to local files, e.g. `--set data.path=/data/*.jsonl`.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"the embedded corpus has splits train and validation, not {split!r}")
    return datasets.Dataset.from_dict({"text": list(_embedded_texts(split))})


# ----------------------------------------------------------------------------- tokenization


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    documents: int  # non-empty documents kept
    skipped: int  # empty documents (SFT: empty output) dropped
    sentences: int  # sentence segments as the mask sees them: anchors + documents not ending in one
    tokens: int  # all ids incl. BOS/EOS and inserted <AC>
    anchors: int  # anchor tokens

    @property
    def anchor_share(self) -> float:
        return self.anchors / max(self.tokens, 1)

    @staticmethod
    def total(parts: list[CorpusStats]) -> CorpusStats:
        """The statistics of the corpus made of `parts` back to back."""
        return CorpusStats(*(sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(CorpusStats)))


class Tokens(Protocol):
    """[total] int32 ids that gather at an int array of positions (`x[positions]`)."""

    def __getitem__(self, positions: np.ndarray, /) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """All documents' ids back to back: doc i is `tokens[offsets[i]:offsets[i+1]]`.

    `tokens` is an array, or any object that gathers an int array of positions (`x[positions]`)
    such as the memory-mapped shards of a prepared corpus (`anjax.train.prepare.ShardedTokens`).
    """

    tokens: Tokens  # [total] int32
    offsets: np.ndarray  # [N+1] int64
    prompt_len: np.ndarray  # [N] int32, leading ids that are never targets (SFT prompt); 0 for text
    stats: CorpusStats

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def check_columns(ds: datasets.Dataset, cfg: DataConfig) -> None:
    """The columns format `cfg.format` reads must be in `ds`."""
    need = {"text": [cfg.text_field], "alpaca": ["instruction", "output"]}[cfg.format]
    if missing := [c for c in need if c not in ds.column_names]:
        raise ValueError(
            f"format {cfg.format!r} needs column(s) {missing}; the dataset has {ds.column_names} (set data.text_field)"
        )


def encode_rows(rows: dict[str, list], encoder: Encoder, cfg: DataConfig) -> tuple[list[list[int]], list[int]]:
    """(ids, prompt lengths) of the non-empty documents among `rows` (columns of raw documents, format
    `cfg.format`): THE step from raw documents to ids, in memory (`tokenize_corpus`) and on disk
    (`anjax.train.prepare`)."""
    if cfg.format == "text":
        texts = [t for t in rows[cfg.text_field] if t and t.strip()]
        return encoder.documents(texts), [0] * len(texts)
    eos = [encoder.tokenizer.eos_token_id] if encoder.tokenizer.eos_token_id is not None else []
    inputs = rows.get("input") or [""] * len(rows["output"])
    keep = [i for i, out in enumerate(rows["output"]) if out and out.strip()]
    pairs = [encoder.alpaca(rows["instruction"][i], inputs[i] or "", rows["output"][i]) for i in keep]
    return [p + r + eos for p, r in pairs], [len(p) for p, _ in pairs]


def encode_dataset(ds: datasets.Dataset, encoder: Encoder, cfg: DataConfig, chunk: int = 1000) -> TokenizedCorpus:
    """All documents of `ds` through `encode_rows`, `chunk` at a time; empty ones skipped and counted
    (the result may hold no document)."""
    ids: list[list[int]] = []
    prompt_len: list[int] = []
    for start in range(0, len(ds), chunk):
        more_ids, more_len = encode_rows(ds[start : start + chunk], encoder, cfg)
        ids += more_ids
        prompt_len += more_len
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(offsets[-1]))
    anchor = np.isin(tokens, np.asarray(encoder.scheme.ids, np.int32))
    n_anchor = int(anchor.sum())
    stats = CorpusStats(
        documents=len(ids),
        skipped=len(ds) - len(ids),
        tokens=len(tokens),
        anchors=n_anchor,
        sentences=n_anchor + int((~anchor[offsets[1:] - 1]).sum()),
    )
    return TokenizedCorpus(tokens, offsets, np.asarray(prompt_len, np.int32), stats)


def tokenize_corpus(
    ds: datasets.Dataset, tokenizer, scheme: AnchorScheme, cfg: DataConfig = DataConfig()
) -> TokenizedCorpus:
    """Tokenize raw documents (format `cfg.format`) in memory with the anchors of `scheme`; empty documents
    are skipped and counted. BOS and `max_sentence_tokens` are the scheme's (train.py builds it from `cfg`).
    The same ids as a corpus prepared on disk (`anjax.train.prepare`)."""
    encoder = Encoder(tokenizer, scheme)
    check_columns(ds, cfg)
    corpus = encode_dataset(ds, encoder, cfg)
    if corpus.stats.documents == 0:
        raise ValueError(f"the corpus has no non-empty documents ({len(ds)} read, all empty)")
    return corpus


# ----------------------------------------------------------------------------- batches


class BatchIterator:
    """Deterministic, resumable iterator over the global batches of a corpus (module docstring: format).

    Epoch e visits the documents of the WHOLE corpus in the order `permutation(seed, e)`.
    Global batch number `step` ([batch_size, L]) is computed directly from (seed, step), and
    this process materializes only its `rows` of it (global row indices, ascending, as
    `anjax.core.sharding.host_batch_to_global` places them; None: all rows) -> [len(rows), L].
    The whole state is `{"step": n}`, independent of the number of processes, so a run
    resumed on another number of hosts continues with exactly the global batches an
    uninterrupted run would have seen. `repeat=True` (training) cycles epochs and drops each
    epoch's last partial batch; `repeat=False` (evaluation) makes one pass, in order unless
    shuffled; rows past the end of the corpus, in the last batch and in any batch after it,
    are padding (valid=0), never the first documents again.
    """

    def __init__(
        self,
        corpus: TokenizedCorpus,
        batch_size: int,
        seq_len: int,
        *,
        packing: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        repeat: bool = True,
        ac_id: int | None = None,
        ac_in_loss: bool = True,
        rows: np.ndarray | None = None,
    ):
        self.corpus, self.B, self.L = corpus, batch_size, seq_len
        self.rows = np.arange(batch_size) if rows is None else np.asarray(rows, np.int64)
        if self.rows.ndim != 1 or len(self.rows) == 0 or self.rows.min() < 0 or self.rows.max() >= batch_size:
            raise ValueError(f"rows must be global row indices in [0, {batch_size}), got {rows}")
        self.packing, self.shuffle, self.seed, self.repeat = packing, shuffle, seed, repeat
        self.ac_id, self.ac_in_loss = ac_id, ac_in_loss
        total = int(corpus.offsets[-1])
        ceil = lambda a, b: -(-a // b)
        n_rows = (total // seq_len if repeat else ceil(total, seq_len)) if packing else len(corpus.lengths)
        self.steps_per_epoch = n_rows // batch_size if repeat else ceil(n_rows, batch_size)
        if self.steps_per_epoch == 0:
            what = f"{total} tokens" if packing else f"{n_rows} documents"
            raise ValueError(f"the corpus ({what}) does not fill one batch of {batch_size} x {seq_len}")
        self.step = 0
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, its _order)

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if not self.repeat and self.step >= self.steps_per_epoch:
            raise StopIteration
        batch = self.batch(self.step)
        self.step += 1
        return batch

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(document order [N], start of each of them in the epoch's stream [N+1])."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            n = len(self.corpus.lengths)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            starts = np.concatenate([[0], np.cumsum(self.corpus.lengths[perm])])
            self._epoch_cache = (epoch, perm, starts)
        _, perm, starts = self._epoch_cache
        return perm, starts

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch number `step` (counted over epochs) without touching the iterator."""
        epoch, index = divmod(step, self.steps_per_epoch) if self.repeat else (0, step)
        perm, starts = self._order(epoch)
        B, L = len(self.rows), self.L
        row_B = index * self.B + self.rows
        t_L1 = np.arange(L + 1)  # L inputs and one more token for the last label
        # each slot holds token `off` of the document perm[k]; k = -1: nothing (padding)
        if self.packing:
            p_BxL1 = row_B[:, None] * L + t_L1  # position in the epoch's stream
            k_BxL1 = np.where(p_BxL1 < starts[-1], np.searchsorted(starts, p_BxL1, side="right") - 1, -1)
            off_BxL1 = p_BxL1 - starts[k_BxL1]
        else:
            n_B = np.where(row_B < len(perm), np.diff(starts)[np.minimum(row_B, len(perm) - 1)], 0)
            k_BxL1 = np.where(t_L1 < n_B[:, None], row_B[:, None], -1)
            off_BxL1 = np.broadcast_to(t_L1, k_BxL1.shape)
        ok_BxL1 = k_BxL1 >= 0
        doc_BxL1 = perm[k_BxL1]
        ids_BxL1 = np.where(
            ok_BxL1, self.corpus.tokens[np.where(ok_BxL1, self.corpus.offsets[doc_BxL1] + off_BxL1, 0)], 0
        )
        valid = ok_BxL1[:, :L]
        labels = ids_BxL1[:, 1:]
        loss_mask = (
            valid
            & ok_BxL1[:, 1:]
            & (k_BxL1[:, 1:] == k_BxL1[:, :L])
            & (off_BxL1[:, 1:] >= self.corpus.prompt_len[doc_BxL1[:, 1:]])
        )
        if not self.ac_in_loss and self.ac_id is not None:
            loss_mask &= labels != self.ac_id
        new_doc = np.concatenate([np.zeros((B, 1), bool), k_BxL1[:, 1:L] != k_BxL1[:, : L - 1]], axis=1)
        return {
            "tokens": ids_BxL1[:, :L].astype(np.int32),
            "doc": np.where(valid, np.cumsum(new_doc, axis=1), -1).astype(np.int32),
            "valid": valid,
            "labels": np.where(loss_mask, labels, 0).astype(np.int32),
            "loss_mask": loss_mask,
        }
