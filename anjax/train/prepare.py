"""A prepared corpus: documents turned into anchored token ids once, in parallel, read by every host.

    prepare        a source (anything `anjax.train.data.load_corpus` reads) -> a directory of shards
    open_prepared  one split of it as a `TokenizedCorpus` over memory-mapped shards (nothing tokenized)
    make_batches   a data config -> the `BatchIterator` of a split (prepared, cached in the run, or in memory)

Layout of a prepared directory (`python -m anjax.prepare`):

    DIR/plan.json                   what is prepared: source and its fingerprint, splits, tokenizer hash,
                                    anchor scheme, document format, shard size; a rerun with the same plan
                                    resumes, any other plan is refused
    DIR/SPLIT/NNNNN.tokens.npy      int32 [n]    the ids of the shard's documents back to back
    DIR/SPLIT/NNNNN.offsets.npy     int64 [d+1]  document i is tokens[offsets[i]:offsets[i+1]]
    DIR/SPLIT/NNNNN.prompt_len.npy  int32 [d]    leading ids that are never targets (SFT prompts)
    DIR/SPLIT/NNNNN.json            the shard's statistics, written after its arrays: the shard is done
    DIR/manifest.json               the plan and every split's counts, written last: the corpus is complete

Shard k holds source documents [k * shard_docs, (k+1) * shard_docs) of its split, encoded by
`anjax.train.data.encode_rows` (the in-memory pipeline's own function), so the shards do not
depend on how many processes wrote them, and a killed prepare resumes with the shards it lacks.
Each file is written under a temporary name and renamed into place.

DIR may be `gs://bucket/...` (etils.epath, gcsfs): `prepare` encodes into a local staging copy
(`local_data_cache()/gs/<sha256 of the URL>`, where an interrupted prepare resumes) and uploads it,
plan first and manifest last; a run reading it (`load_split`) copies the manifest's shards into the
same place on its host once (what is there already with the right size is kept) and memory-maps them.

Why plain .npy files: the loader gathers a packed row of 4,096 ids from a flat token stream
(`BatchIterator`), which a memory-mapped array serves with one slice per document and no
decoding; the files are the arrays themselves (numpy only, no new dependency), one open per
shard. Anchor flags are not stored: they are `isin(ids, scheme.ids)`, and the scheme is in the
manifest (one anchoring, stored with the model).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from anjax.io import outputs
from anjax.io.run_dir import is_remote, storage_path
from anjax.text.anchors import AnchorScheme
from anjax.text.encode import Encoder
from anjax.train.data import (
    BatchIterator,
    CorpusStats,
    DataConfig,
    TokenizedCorpus,
    check_columns,
    embedded_corpus,
    encode_dataset,
    load_corpus,
    local_files,
    tokenize_corpus,
)

PLAN, MANIFEST = "plan.json", "manifest.json"
SHARD_DOCS = 16384  # documents per shard: ~8M ids of RedPajama text, 32 MB
ARRAYS = {"tokens": np.int32, "offsets": np.int64, "prompt_len": np.int32}


# ----------------------------------------------------------------------------- identity


def local_data_cache() -> Path:
    """Where this host keeps corpora whose home is remote: $XDG_CACHE_HOME/anjax/data (default ~/.cache)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "anjax" / "data"


def _staging(url: str) -> Path:
    """This host's local copy of the prepared directory at `url` (gs://)."""
    return local_data_cache() / "gs" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary, merges, added tokens (`<AC>`) and normalization rules
    (its tokenizer.json without the padding/truncation settings of the moment)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("padding", None)
    spec.pop("truncation", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def source_fingerprint(cfg: DataConfig, split: str) -> str:
    """sha256 of what the documents of `split` are read from: the source's name and split, and for local
    files each file's path, size and modification time (contents are not read); the embedded corpus's text."""
    parts: list = [cfg.path or "embedded", cfg.name, split, cfg.format, cfg.text_field, cfg.text_sample_by]
    if cfg.path in (None, "", "embedded"):
        parts.append(hashlib.sha256("\0".join(embedded_corpus(split)["text"]).encode()).hexdigest())
    else:
        path = os.path.expanduser(cfg.path)
        files = (
            sorted(str(p) for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else None
        ) or local_files(path)
        for f in files or ():
            st = os.stat(f)
            parts.append((os.path.abspath(f), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def make_plan(
    cfg: DataConfig, tokenizer, scheme: AnchorScheme, splits: dict[str, str], shard_docs: int = SHARD_DOCS
) -> dict:
    """The plan of a prepared directory: splits {name: source split}, everything that decides its ids."""
    for name in splits:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"split name {name!r}: use letters, digits, '_', '.', '-'")
    return {
        "source": {"path": cfg.path, "name": cfg.name, "text_field": cfg.text_field, "sample_by": cfg.text_sample_by},
        "format": cfg.format,
        "splits": dict(splits),
        "fingerprints": {name: source_fingerprint(cfg, spec) for name, spec in splits.items()},
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "scheme": scheme.to_dict(),
        "shard_docs": shard_docs,
    }


def is_prepared(path: str | os.PathLike | None) -> bool:
    """`path` is a prepared directory (finished or not), local or gs://."""
    if path in (None, "", "embedded"):
        return False
    if is_remote(path):
        return (storage_path(path, "data.path") / PLAN).exists()
    return (Path(os.path.expanduser(path)) / PLAN).is_file()


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a finished prepared directory (local or gs://); ValueError when the prepare has not finished."""
    file = (storage_path(path, "data.path") if is_remote(path) else Path(os.path.expanduser(path))) / MANIFEST
    if not file.exists():
        raise ValueError(
            f"{file.parent} is an unfinished prepared corpus (no {MANIFEST}): rerun the same "
            "python -m anjax.prepare command to finish it"
        )
    return json.loads(file.read_text())


def check_compatible(manifest: dict, path, tokenizer, scheme: AnchorScheme, cfg: DataConfig) -> None:
    """ValueError (one line) unless `path` was prepared with this tokenizer, anchor scheme and document format."""
    redo = "prepare it again with the model's tokenizer and anchors (python -m anjax.prepare)"
    if manifest["tokenizer_sha256"] != (mine := tokenizer_hash(tokenizer)):
        raise ValueError(
            f"{path} was prepared with another tokenizer (sha256 {manifest['tokenizer_sha256'][:12]}, "
            f"the model's is {mine[:12]}): {redo}"
        )
    if manifest["scheme"] != (ours := scheme.to_dict()):
        diff = ", ".join(
            f"{k}={manifest['scheme'].get(k)!r} (model: {v!r})"
            for k, v in ours.items()
            if manifest["scheme"].get(k) != v
        )
        raise ValueError(f"{path} was prepared with another anchor scheme: {diff}: {redo}")
    if manifest["format"] != cfg.format:
        raise ValueError(f"{path} holds format {manifest['format']!r} documents, data.format is {cfg.format!r}")


# ----------------------------------------------------------------------------- writing


def _atomic(path: Path, write: Callable, value) -> None:
    """`write(file, value)` in memory, then `path` written atomically (`anjax.io.outputs`): a reader sees all
    of it or nothing, a full disk is one error naming `path` and leaves no partial file."""
    buffer = io.BytesIO()
    write(buffer, value)
    outputs.write_bytes_chunks(path, [buffer.getbuffer()])


def _write_json(path: Path, value: dict) -> None:
    _atomic(path, lambda f, v: f.write((json.dumps(v, indent=1) + "\n").encode()), value)


def shard_stem(directory: Path, split: str, index: int) -> Path:
    return directory / split / f"{index:05d}"


def write_shard(stem: Path, corpus: TokenizedCorpus) -> dict:
    """The arrays of `corpus` as shard `stem`, then its statistics (the shard's completion mark); returns them."""
    for name, dtype in ARRAYS.items():
        _atomic(stem.with_name(f"{stem.name}.{name}.npy"), np.save, getattr(corpus, name).astype(dtype))
    stats = dataclasses.asdict(corpus.stats)
    _write_json(stem.with_name(f"{stem.name}.json"), stats)
    return stats


_WORKER: dict = {}


def _init_worker(ds, tokenizer, scheme: AnchorScheme, cfg: DataConfig, shard_docs: int) -> None:
    _WORKER.update(ds=ds, encoder=Encoder(tokenizer, scheme), cfg=cfg, shard_docs=shard_docs)


def _encode_shard(task: tuple[Path, int]) -> tuple[int, dict, float]:
    """(index, statistics, seconds) of shard `index`, written under `stem`."""
    stem, index = task
    t0 = time.perf_counter()
    w = _WORKER
    lo = index * w["shard_docs"]
    part = w["ds"].select(range(lo, min(lo + w["shard_docs"], len(w["ds"]))))
    return index, write_shard(stem, encode_dataset(part, w["encoder"], w["cfg"])), time.perf_counter() - t0


def prepare(
    cfg: DataConfig,
    tokenizer,
    scheme: AnchorScheme,
    out: str | os.PathLike,
    splits: dict[str, str],
    *,
    workers: int | None = None,
    shard_docs: int = SHARD_DOCS,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Prepare `splits` ({name: source split of cfg's source}) into `out`; returns the manifest.

    Shards are encoded by `workers` processes (default cfg.num_proc, else every core); a directory
    holding part of the same plan is completed (only missing shards are encoded), a finished one is
    returned as it is, one with another plan is refused.
    """
    log = log or (lambda _: None)
    if is_remote(out):
        return _prepare_remote(cfg, tokenizer, scheme, os.fspath(out), splits, workers, shard_docs, log)
    out = Path(os.path.expanduser(out))
    plan = make_plan(cfg, tokenizer, scheme, splits, shard_docs)
    if (out / PLAN).is_file():
        old = json.loads((out / PLAN).read_text())
        if old != plan:
            keys = ", ".join(k for k in plan if old.get(k) != plan[k])
            raise ValueError(f"{out} holds a corpus prepared with other settings ({keys} differ): choose another --out")
        if (out / MANIFEST).is_file():
            return read_manifest(out)
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a prepared corpus: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / PLAN, plan)
    Encoder(tokenizer, scheme)  # checks the scheme against the tokenizer before any work
    workers = workers or cfg.num_proc or os.cpu_count() or 1
    counts = {}
    for name, spec in splits.items():
        ds = load_corpus(cfg, spec)
        check_columns(ds, cfg)
        (out / name).mkdir(exist_ok=True)
        n_shards = max(-(-len(ds) // shard_docs), 1)
        todo = [
            (shard_stem(out, name, k), k)
            for k in range(n_shards)
            if not shard_stem(out, name, k).with_suffix(".json").is_file()
        ]
        t0, tokens = time.perf_counter(), 0
        log(
            f"{name}: {len(ds)} documents, {n_shards} shards, {len(todo)} to encode "
            f"with {min(workers, len(todo))} processes"
        )
        args = (ds, tokenizer, scheme, cfg, shard_docs)
        if min(workers, len(todo)) <= 1:
            _init_worker(*args)
            results = map(_encode_shard, todo)
            pool = None
        else:  # spawn: the parent may hold JAX threads, which fork would copy half-alive
            pool = multiprocessing.get_context("spawn").Pool(min(workers, len(todo)), _init_worker, args)
            results = pool.imap_unordered(_encode_shard, todo)
        try:
            for done, (index, stats, seconds) in enumerate(results, 1):
                tokens += stats["tokens"]
                log(f"{name}: shard {index} done ({stats['tokens']:,} tokens in {seconds:.1f} s), {done}/{len(todo)}")
        finally:
            if pool is not None:
                pool.terminate()
        _WORKER.clear()
        seconds = time.perf_counter() - t0
        log(f"{name}: encoded {tokens:,} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} tokens/s)")
        counts[name] = n_shards
    return write_manifest(out, plan, counts)


def _prepare_remote(cfg, tokenizer, scheme, url: str, splits, workers, shard_docs, log) -> dict:
    """`prepare` into gs:// `url`: into the local staging copy, then uploaded (plan first, manifest last)."""
    remote, plan = storage_path(url, "--out"), make_plan(cfg, tokenizer, scheme, splits, shard_docs)
    if (remote / PLAN).exists():
        if json.loads((remote / PLAN).read_text()) != plan:
            raise ValueError(f"{url} holds a corpus prepared with other settings: choose another --out")
        if (remote / MANIFEST).exists():
            return json.loads((remote / MANIFEST).read_text())
    elif remote.exists() and any(remote.iterdir()):
        raise ValueError(f"{url} exists and is not a prepared corpus: choose another --out")
    local = _staging(url)
    manifest = prepare(cfg, tokenizer, scheme, local, splits, workers=workers, shard_docs=shard_docs, log=log)
    files = [local / PLAN, *(f for name in splits for f in sorted((local / name).glob("[0-9]*"))), local / MANIFEST]
    for f in files:
        (remote / f.relative_to(local).parent).mkdir(parents=True, exist_ok=True)
        (remote / f.relative_to(local)).write_bytes(f.read_bytes())
    log(f"uploaded {len(files)} files to {url}")
    return manifest


def _fetch(url: str, manifest: dict) -> Path:
    """The finished prepared directory at gs:// `url` (its `manifest`), copied into its local staging place
    (files whose size already matches are kept; the manifest goes last: a copy is complete once it has one).
    Processes of one host may fetch at once: every file is written atomically under a name of its own."""
    remote, local = storage_path(url, "data.path"), _staging(url)
    if (local / MANIFEST).is_file() and json.loads((local / MANIFEST).read_text()) == manifest:
        return local
    for split, counts in manifest["counts"].items():
        (local / split).mkdir(parents=True, exist_ok=True)
        for k in range(counts["shards"]):
            for name in [f"{k:05d}.{array}.npy" for array in ARRAYS] + [f"{k:05d}.json"]:
                src, dst = remote / split / name, local / split / name
                if not dst.is_file() or dst.stat().st_size != src.stat().length:
                    _atomic(dst, lambda f, v: f.write(v), src.read_bytes())
    _atomic(local / PLAN, lambda f, v: f.write(v), (remote / PLAN).read_bytes())
    _write_json(local / MANIFEST, manifest)
    return local


def write_manifest(out: Path, plan: dict, shards: dict[str, int]) -> dict:
    """Finish `out`: the manifest (the plan and each split's counts, from its `shards[split]` shard files)."""
    summary = {}
    for name, n_shards in shards.items():
        stats = [json.loads(shard_stem(out, name, k).with_suffix(".json").read_text()) for k in range(n_shards)]
        total = CorpusStats.total([CorpusStats(**s) for s in stats])
        if total.documents == 0:
            raise ValueError(f"split {plan['splits'][name]!r} of the corpus has no non-empty documents (all empty)")
        summary[name] = {"shards": n_shards, **dataclasses.asdict(total), "shard_tokens": [s["tokens"] for s in stats]}
    manifest = {**plan, "counts": summary}
    _write_json(out / MANIFEST, manifest)
    return manifest


# ----------------------------------------------------------------------------- reading


class ShardedTokens:
    """The token arrays of several shards read as one: `x[positions]` gathers int32 ids at global positions."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, np.int64)
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        out = np.empty(positions.shape, np.int32)
        for k in np.unique(shard):
            at = shard == k
            out[at] = self.parts[k][positions[at] - self.starts[k]]
        return out


def open_prepared(path: str | os.PathLike, split: str) -> TokenizedCorpus:
    """Split `split` of a finished prepared directory; token ids stay on disk (memory-mapped)."""
    path = Path(os.path.expanduser(path))
    manifest = read_manifest(path)
    if split not in manifest["counts"]:
        raise ValueError(f"{path} has no split {split!r}; it has {', '.join(manifest['counts'])}")
    counts = manifest["counts"][split]
    load = lambda k, name, **kw: np.load(f"{shard_stem(path, split, k)}.{name}.npy", **kw)
    tokens = [load(k, "tokens", mmap_mode="r") for k in range(counts["shards"])]
    if [len(t) for t in tokens] != counts["shard_tokens"]:
        raise ValueError(f"{path / split}: shard files do not match {MANIFEST} (damaged or replaced): prepare it again")
    starts = np.concatenate([[0], np.cumsum(counts["shard_tokens"])])
    offsets = [load(k, "offsets")[:-1] + starts[k] for k in range(counts["shards"])] + [starts[-1:]]
    prompt_len = [load(k, "prompt_len") for k in range(counts["shards"])]
    stats = CorpusStats(**{f.name: counts[f.name] for f in dataclasses.fields(CorpusStats)})
    return TokenizedCorpus(
        tokens[0] if len(tokens) == 1 else ShardedTokens(tokens),
        np.concatenate(offsets).astype(np.int64),
        np.concatenate(prompt_len).astype(np.int32),
        stats,
    )


# ----------------------------------------------------------------------------- batches of a run


def cache_location(cfg: DataConfig, tokenizer, scheme: AnchorScheme, split: str, cache_dir: str | os.PathLike) -> Path:
    """Where a run keeps `split` of a source that is not a prepared directory: CACHE/<sha256 of its plan>."""
    plan = make_plan(cfg, tokenizer, scheme, {"data": split})
    return Path(cache_dir) / hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def load_split(
    cfg: DataConfig, tokenizer, scheme: AnchorScheme, split: str, cache_dir: str | os.PathLike | None = None
) -> TokenizedCorpus:
    """Split `split` of cfg's source: a prepared directory is opened (after checking its tokenizer, scheme
    and format); another source is prepared into `cache_dir` on first use, or with no cache_dir encoded in memory."""
    if cfg.path is not None and is_prepared(cfg.path):
        manifest = read_manifest(cfg.path)
        check_compatible(manifest, cfg.path, tokenizer, scheme, cfg)  # before a remote corpus is copied
        return open_prepared(_fetch(os.fspath(cfg.path), manifest) if is_remote(cfg.path) else cfg.path, split)
    if cfg.path and is_remote(cfg.path):  # None: the embedded corpus
        raise ValueError(
            f"data.path={cfg.path} is not a prepared corpus: on gs:// prepare it there first "
            f"(python -m anjax.prepare --out {cfg.path})"
        )
    if cache_dir is None:
        return tokenize_corpus(load_corpus(cfg, split), tokenizer, scheme, cfg)
    where = cache_location(cfg, tokenizer, scheme, split, cache_dir)
    log = lambda message: print(f"{where}/{message}", file=sys.stderr, flush=True)  # the progress of a first use
    prepare(cfg, tokenizer, scheme, where, {"data": split}, log=log)
    return open_prepared(where, "data")


def make_batches(
    cfg: DataConfig,
    tokenizer,
    scheme: AnchorScheme,
    *,
    split: str | None = None,
    train: bool = True,
    rows: np.ndarray | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> BatchIterator:
    """The global batches of `split` (default cfg.split, or cfg.eval_split when not train), of which this
    process reads `rows` (global row indices; None: all). train=True: shuffled, repeating;
    train=False: one ordered pass, padded past the end. The corpus statistics are at `.corpus.stats`."""
    split = split or (cfg.split if train else cfg.eval_split)
    if split is None:
        raise ValueError("no split to load (data.eval_split is null)")
    return BatchIterator(
        load_split(cfg, tokenizer, scheme, split, cache_dir),
        cfg.batch_size,
        cfg.seq_len,
        packing=cfg.packing,
        shuffle=cfg.shuffle and train,
        seed=cfg.seed,
        repeat=train,
        ac_id=scheme.ac_id,
        ac_in_loss=cfg.ac_in_loss,
        rows=rows,
    )
