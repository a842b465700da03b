"""Held-out perplexity under the training-free policies: `Scorer.sequence_nll` with a `Policy`, streamed
(`anjax.inference.policies.stream_step`), and `python -m anjax.evaluate --perplexity --budget`.

The oracle is `policy_oracle.streamed_nll`, a brute-force forward written from the streamed definition.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import slow_case
from policy_oracle import streamed_nll

from anjax import cli
from anjax.cli import evaluate as evaluate_cli
from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.eval import perplexity
from anjax.inference import policies, scoring
from anjax.inference.policies import Policy
from anjax.io import hf

SLICES = Path(__file__).parent / "data" / "tasks"
TEXTS = (
    "The cat sat on the mat. Did the dog see it? Yes! The dog saw the cat, and the cat ran.",
    "Mr. Smith went to Washington. He arrived at 3 p.m. and left at 5 p.m. on the same day.",
    "Numbers like 12, 345 and 6789 appear too.",
)


@pytest.fixture(scope="module")
def tiny_params():
    cfg = tiny_config(vocab_size=400)
    return cfg, init_params(cfg, jax.random.key(3))


@pytest.fixture
def model(tiny_params, tiny_tokenizer):
    return scoring.scoring_model(*tiny_params, tiny_tokenizer, anchor_mode="ep")


def _rows(model):
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


@pytest.mark.parametrize(
    "kind, chunk",
    [
        ("h2o", 1),
        slow_case("snapkv", 3),
        slow_case("h2o", 3),
        slow_case("snapkv", 1),
        slow_case("window", 1),
        slow_case("window", 3),
    ],
)
def test_streamed_policy_equals_brute_force(tiny_params, model, kind, chunk):
    """Each row's streamed NLL equals the brute-force per-chunk forward, at budgets below the row (rows of
    different lengths and budgets in one batch); the cache holds the budget at the row's end."""
    cfg, params = tiny_params
    rows = _rows(model)
    budgets = [7, 5, 9]
    policy = Policy(kind, sink=2, obs=3, kernel=3)
    res = scoring.Scorer(model, batch_size=2, chunk_size=chunk).sequence_nll(rows, policy, budgets=budgets)
    want = [streamed_nll(cfg, params, r, policy, b, chunk) for r, b in zip(rows, budgets)]
    np.testing.assert_allclose(res["nll"], want, rtol=1e-4, atol=1e-4)
    assert res["held_slots"] == budgets and res["tokens"] == [len(r) - 1 for r in rows]


def test_oracle_sees_the_eviction(tiny_params, model):
    """The oracle is not vacuous: a smaller budget changes the NLL, a budget covering the row gives the full cache's."""
    cfg, params = tiny_params
    row = _rows(model)[0]
    full = scoring.Scorer(model, batch_size=1, chunk_size=4).sequence_nll([row], "full")["nll"][0]
    whole, small = (streamed_nll(cfg, params, row, Policy("h2o"), b, 4) for b in (len(row), 4))
    assert whole == pytest.approx(full, rel=1e-5) and abs(small - full) > 1e-2


@pytest.mark.parametrize("chunk", [slow_case(4), slow_case(1)])  # the fast tier: the oracle test above
def test_budget_covering_the_row_equals_full(model, chunk):
    """Budget >= row tokens: nothing is evicted, every policy's NLL is the full cache's (fp32)."""
    rows = _rows(model)
    scorer = scoring.Scorer(model, batch_size=2, chunk_size=chunk)
    full = scorer.sequence_nll(rows, "full")
    for kind in policies.POLICIES:
        res = scorer.sequence_nll(rows, Policy(kind), budgets=[len(r) - 1 + 3 * (i % 2) for i, r in enumerate(rows)])
        np.testing.assert_allclose(res["nll"], full["nll"], rtol=1e-5, atol=1e-5)
        assert res["held_slots"] == full["held_slots"] == [len(r) - 1 for r in rows]


def test_policies_stream_through_their_own_chunk(model):
    """`perplexity` streams the policies through `streamer` (evaluate's --policy-chunk, default 1) and the full
    cache through `scorer`: h2o's NLL is the token-by-token stream's, not the 4-token chunks'."""
    rows = _rows(model)
    coarse, fine = (scoring.Scorer(model, batch_size=2, chunk_size=c) for c in (4, 1))
    res = perplexity.perplexity(coarse, rows, None, ["full", "h2o@0.5"], streamer=fine)
    budgets = perplexity.row_budgets(rows, 0.5, model.anchor_ids)
    by_token, by_chunk = (s.sequence_nll(rows, Policy("h2o"), budgets=budgets)["nll"] for s in (fine, coarse))
    np.testing.assert_allclose(res["h2o@0.5"]["nll_per_row"], by_token, rtol=1e-6)
    assert not np.allclose(by_token, by_chunk, rtol=1e-3)


def test_budgets_are_checked(model):
    scorer = scoring.Scorer(model)
    with pytest.raises(ValueError, match="one budget per row"):
        scorer.sequence_nll(_rows(model), Policy("h2o"), budgets=[4])
    with pytest.raises(ValueError, match="one budget per row"):
        scorer.sequence_nll(_rows(model), "full", budgets=[4, 4, 4])


def test_row_budgets_match_anchor_is_the_anchor_cache_at_the_row_end(model):
    rows = _rows(model)
    anchor = scoring.Scorer(model, batch_size=2, chunk_size=4).sequence_nll(rows, "anchor")
    assert perplexity.row_budgets(rows, "match-anchor", model.anchor_ids) == anchor["held_slots"]
    assert perplexity.row_budgets(rows, 0.1, model.anchor_ids) == [max(1, int(0.1 * (len(r) - 1))) for r in rows]


@pytest.fixture
def tiny_model_dir(tiny_params, tiny_tokenizer, tmp_path):
    """The tiny model as an HF directory without anchor settings."""
    return hf.save_hf_dir(*tiny_params, tiny_tokenizer, tmp_path / "tiny")


def test_cli_perplexity_with_a_policy(tiny_model_dir, tmp_path, capsys):
    """`--perplexity --cache full,h2o,sepllm --budget 0.5` writes the report: h2o@0.5 with its ppl, interval, paired
    ratio to full and C↓ (half the row, rounded down), and training-free SepLLM with its settings; a rerun takes each
    cache's saved scores."""
    argv = ["--perplexity", "--model", str(tiny_model_dir), "--data-dir", str(SLICES), "--limit", "2"]
    argv += ["--cache", "full,h2o,sepllm", "--budget", "0.5", "--seq-len", "48", "--chunk-size", "8"]
    assert evaluate_cli.main([*argv, "--out-dir", str(tmp_path), "--name", "p"]) == 0
    out = json.loads((tmp_path / "p.json").read_text())
    res, ratio = out["results"], out["ratios"]["h2o@0.5 / full"]
    assert list(res) == ["full", "sepllm", "h2o@0.5"] and res["h2o@0.5"]["tokens"] == res["full"]["tokens"] > 50
    assert 0.5 <= res["h2o@0.5"]["c_reduction"] < 0.6 and res["full"]["c_reduction"] == 0
    assert ratio["ppl_ratio"] == pytest.approx(res["h2o@0.5"]["ppl"] / res["full"]["ppl"], rel=1e-9)
    assert ratio["ppl_ratio_ci"][0] <= ratio["ppl_ratio"] <= ratio["ppl_ratio_ci"][1] and ratio["ppl_ratio"] != 1
    assert out["policies"]["h2o"] == {"kind": "h2o", "sink": 4, "obs": 8, "kernel": 5} and out["chunk_size"] == 8
    assert out["policy_chunk"] == 1  # h2o evicts after every token, whatever the full cache's chunk
    text = (tmp_path / "p.md").read_text()
    assert "| tiny | h2o@0.5 |" in text and "| tiny | sepllm |" in text
    assert "sepllm (window 64, sink 4, separators . , ? ! ; :)" in text

    # each cache was saved as it finished: a rerun scores none again, a changed setting is refused
    assert sorted(f.name for f in (tmp_path / "p.caches").iterdir()) == ["full.json", "h2o@0.5.json", "sepllm.json"]
    first = out["results"]
    assert evaluate_cli.main([*argv, "--out-dir", str(tmp_path), "--name", "p"]) == 0
    assert "sepllm: saved in" in capsys.readouterr().out
    again = json.loads((tmp_path / "p.json").read_text())["results"]
    assert {c: (r["nll_per_row"], r["c_reduction"]) for c, r in again.items()} == {
        c: (r["nll_per_row"], r["c_reduction"]) for c, r in first.items()
    }
    with pytest.raises(
        ValueError, match=r"p.caches/full.json holds full scored with other settings \(chunk_size differ"
    ):
        evaluate_cli.main([*argv[:-1], "16", "--out-dir", str(tmp_path), "--name", "p"])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--cache", "full", "--budget", "0.5"], "--budget applies to the policies"),
        (["--cache", "full,h2o"], "needs --budget"),
        (["--cache", "full,h2o", "--budget", "2"], "--budget must be match-anchor or a fraction"),
        (["--cache", "snapkv", "--budget", "0.5", "--kernel", "2"], "odd kernel"),
        (["--cache", "h2o", "--budget", "0.5", "--policy-chunk", "0"], "--policy-chunk must be >= 1"),
    ],
)
def test_cli_perplexity_bad_policy_input_is_one_line_exit_2(args, fragment, capsys):
    """Refused while the arguments are checked, before any model or data loads."""
    with pytest.raises(SystemExit) as exit_:
        cli.run(evaluate_cli.main, ["--perplexity", "--model", "/nonexistent", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
