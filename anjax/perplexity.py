"""Perplexity on long held-out text through the engine, with a full and an anchor cache.

    python -m anjax.evaluate --perplexity --cache full,anchor --anchor-mode ep --limit 200
    python -m anjax.evaluate --perplexity --cache full,anchor --anchor-mode ac --ac-every 32

Text: LAMBADA (OpenAI) test passages, each encoded like training data (AC: `<AC>`
after every sentence, and with `--ac-every N` after every N tokens of a longer
one), joined by a blank line into one stream and cut into rows of `--seq-len`
tokens (the last row may be shorter). Each row is fed through chunked prefill
(`anjax.scoring.Scorer.sequence_nll`): every token is predicted from the cache
as it stands, so the anchor row is the model's perplexity under the AnSAN mask,
reached with a compacted cache. Scored targets: every text token after the
row's first; inserted `<AC>` targets are not scored (they are not text), so
every mode scores the same text (AC tokenization may split a few sentence
boundaries differently: the token counts can differ slightly). C↓ = 1 − slots
held at the end of the rows / row tokens.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

from anjax import tasks
from anjax.scoring import Scorer, ScoringModel


def text_rows(model: ScoringModel, texts: Sequence[str], seq_len: int,
              ac_every: int | None = None) -> tuple[list[list[int]], list[list[bool]]]:
    """(rows of ids, scored flags): passages joined by a blank line, cut every `seq_len` ids."""
    if not texts:
        raise ValueError("no text to score")
    sep = model.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for text in texts:
        stream += (sep if stream else []) + model.encode_text(text, ac_every)[int(model.add_bos):]
    bos = [model.tokenizer.bos_token_id] if model.add_bos else []
    width = seq_len - len(bos)
    rows = [bos + stream[i:i + width] for i in range(0, len(stream), width)]
    rows = [r for r in rows if len(r) >= 2]
    ac = model.ac_id
    scored = [[t > 0 and (r[t] != ac) for t in range(len(r))] for r in rows]
    return rows, scored


def perplexity(scorer: Scorer, rows, scored, caches: Sequence[str]) -> dict[str, dict]:
    """{cache: ppl, nll per token, scored tokens, C↓, seconds} over the same rows."""
    out = {}
    for cache in caches:
        res = scorer.sequence_nll(rows, cache, scored)
        n = sum(res["tokens"])
        nll = sum(res["nll"]) / n
        full = sum(len(r) - 1 for r in rows)
        out[cache] = {"ppl": math.exp(nll), "nll_per_token": nll, "tokens": n, "rows": len(rows),
                      "cache_slots": sum(res["held_slots"]), "full_cache_slots": full,
                      "c_reduction": 1 - sum(res["held_slots"]) / full, "seconds": res["seconds"]}
    return out


def markdown(report: dict) -> str:
    lines = [f"Perplexity, LAMBADA passages in rows of {report['seq_len']} tokens "
             f"({report['passages']} passages, anchors: {report['anchor_mode']}"
             + (f", <AC> every {report['ac_every']} tokens" if report["ac_every"] else "") + ")", "",
             "| model | cache | ppl | tokens | C↓ | seconds |", "|---|---|---|---|---|---|"]
    for cache, r in report["results"].items():
        lines.append(f"| {report['model']} | {cache} | {r['ppl']:.2f} | {r['tokens']} | "
                     f"{100 * r['c_reduction']:.1f}% | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(args, caches: Sequence[str]) -> int:
    """The `--perplexity` mode of `python -m anjax.evaluate` (arguments parsed there)."""
    from anjax.evaluate import load_model_for, save

    texts = tasks.lambada_texts(args.data_dir, args.limit)
    model = load_model_for(args, caches)
    scorer = Scorer(model, batch_size=args.batch_size, chunk_size=args.chunk_size)
    rows, scored = text_rows(model, texts, args.seq_len, args.ac_every)
    t0 = time.perf_counter()
    report = {"model": model.name, "anchor_mode": model.anchor_mode, "ac_every": args.ac_every,
              "seq_len": args.seq_len, "passages": len(texts), "caches": list(caches),
              "results": perplexity(scorer, rows, scored, caches)}
    report.update(wall_seconds=time.perf_counter() - t0, compile_seconds=scorer.compile_seconds)
    text = markdown(report)
    print(text)
    save(report, text, args.out_dir, args.name, args.json, png=False)
    return 0
