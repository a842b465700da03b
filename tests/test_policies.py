"""Training-free cache policies (anjax/inference/policies.py) and their equal-budget evaluation.

The oracle is `policy_oracle.brute_force`: every layer's attention under an explicit mask per
(layer, KV head), written from the model's definition.
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from conftest import slow_case
from policy_oracle import brute_force

from anjax.cli import report
from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.eval import evaluate, tasks
from anjax.inference import policies, scoring
from anjax.inference.policies import Policy
from anjax.io import hf

REPO = Path(__file__).resolve().parent.parent
SLICES = Path(__file__).parent / "data" / "tasks"


@pytest.fixture(scope="module")
def tiny_params():
    cfg = tiny_config(vocab_size=400)
    return cfg, init_params(cfg, jax.random.key(1))


def brute_loglik(cfg, params, request, choice, policy=None, budget=None):
    ids = list(request.prefix + request.tails[choice] + request.continuations[choice])
    n = len(request.prefix) - 1
    logp, _, _ = brute_force(cfg, params, ids, n, policy, budget)
    start = len(ids) - len(request.continuations[choice])
    return sum(float(logp[start - 1 + j, t]) for j, t in enumerate(request.continuations[choice]))


ITEMS = [
    [
        ("The cat sat on the mat. Did the dog see it? Yes! The dog saw the cat, and the cat saw the dog", c)
        for c in (" ran.", " sat on the mat")
    ],
    [("Mr. Smith went to Washington. He arrived at 3", " p.m."), ("Mr. Smith went to Washington. She came", " too")],
    [("A short one. It ends here and then it goes on for a while without", c) for c in (" end.", " a stop", " x")],
]


@pytest.fixture
def model(tiny_params, tiny_tokenizer):
    cfg, params = tiny_params
    return scoring.scoring_model(cfg, params, tiny_tokenizer, anchor_mode="ep")


def _requests(model):
    return [model.encode_request(pairs) for pairs in ITEMS]


@pytest.mark.parametrize("kind", policies.POLICIES)
def test_policy_equals_brute_force_with_its_kept_set(tiny_params, model, kind):
    """Every choice's log-likelihood equals the brute-force forward under the policy's per-head kept set,
    at a budget below the prompt (several prefill chunks: chunk_size 8)."""
    cfg, params = tiny_params
    reqs = _requests(model)
    policy = Policy(kind, sink=2, obs=3, kernel=3)
    budgets = [max(4, (len(r.prefix) - 1) // 3) for r in reqs]
    out = scoring.Scorer(model, batch_size=2, chunk_size=8).run_paths(reqs, [(policy, budgets)])[0]
    for r, b, ll, held in zip(reqs, budgets, out.loglik, out.held_slots):
        assert held == b
        want = [brute_loglik(cfg, params, r, c, policy, b) for c in range(r.k)]
        np.testing.assert_allclose(ll, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", [slow_case(k) for k in policies.POLICIES])  # fast: test_keep_rules_on_hand_made_mass
def test_budget_covering_the_prompt_equals_full(model, kind):
    """W (or any budget) >= prompt keeps every token: the full cache's scores. (The fast tier runs snapkv here;
    every rule's keep-everything at budget = prompt is in `test_keep_rules_on_hand_made_mass`.)"""
    reqs = _requests(model)
    scorer = scoring.Scorer(model, batch_size=2, chunk_size=8)
    budgets = [len(r.prefix) - 1 + 5 for r in reqs]
    full, pol = scorer.run_paths(reqs, [("full", False), (Policy(kind), budgets)])
    np.testing.assert_allclose(np.concatenate(pol.loglik), np.concatenate(full.loglik), rtol=1e-5, atol=1e-5)
    assert pol.held_slots == full.held_slots


def test_paths_sharing_a_prefill_score_as_each_alone(model):
    """`run_paths` prefills each batch once per kind (full cache and `window`: one plain prefill; `snapkv`
    and `h2o`: one `observe` for every distinct observer) and every path's results are bitwise those of
    the path run alone."""
    reqs = _requests(model)
    scorer = scoring.Scorer(model, batch_size=2, chunk_size=8)
    n = [len(r.prefix) - 1 for r in reqs]
    third, half = [max(2, x // 3) for x in n], [max(2, x // 2) for x in n]
    paths = [
        ("full", False),
        ("anchor", False),
        (Policy("window", sink=2), third),
        (Policy("window"), half),
        (Policy("snapkv", obs=3, kernel=3), third),
        (Policy("snapkv", obs=3), half),
        (Policy("snapkv", obs=5), third),
        (Policy("h2o"), third),
        (Policy("h2o", sink=1), half),
        ("full", True),
    ]
    calls, call = [], scorer.runtime.call
    scorer.runtime.call = lambda fn, static, *args, **kw: calls.append((fn, static)) or call(fn, static, *args, **kw)
    together = scorer.run_paths(reqs, paths)
    scorer.runtime.call = call
    chunks = [-(-max(n[i] for i in rows) // 8) for rows in ([0, 2], [1])]  # batches longest first
    observers = {static[1] for fn, static in calls if fn is policies.observe}
    assert observers == {(Policy("snapkv", obs=3), Policy("snapkv", obs=5), Policy("h2o"))}
    assert sum(fn is policies.observe for fn, _ in calls) == sum(chunks)
    assert sum(fn is scoring.prefill for fn, _ in calls) == 2 * sum(chunks)  # full (shared by window), anchor
    for path, out in zip(paths, together):
        alone = scorer.run_paths(reqs, [path])[0]
        assert (out.loglik, out.greedy, out.held_slots, out.tokens) == (
            alone.loglik,
            alone.greedy,
            alone.held_slots,
            alone.tokens,
        )
    assert together[2].loglik != together[3].loglik and together[4].loglik != together[6].loglik


def test_observed_mass_and_kept_slots_per_head(tiny_params, model):
    """`observe` records the brute-force attention mass per layer and KV head; `select` keeps, per head,
    the slots `Policy.keep` names and nothing else (heads differ), and their mass in the same order."""
    cfg, params = tiny_params
    ids = model.encode_request(ITEMS[0]).prefix[:-1]
    n, T = len(ids), 8
    tokens, valid = scoring.right_align([ids], T)
    from anjax.inference.state import init_state

    policy = Policy("snapkv", obs=4, kernel=1)
    state = init_state(model.cfg, 1, 64 + T, np.zeros(1, bool))
    mass = jnp.zeros((2, cfg.num_layers, 1, cfg.num_kv_heads, 64 + T))
    observe = jax.jit(policies.observe, static_argnums=(0, 1))  # one compile for every chunk, not op by op
    for c in range(0, tokens.shape[1], T):
        chunk = (tokens[:, c : c + T], valid[:, c : c + T])
        state, mass = observe(model.cfg, (policy, Policy("h2o")), model.params, state, mass, *chunk, jnp.array([n]))
    _, h2o_mass, _ = brute_force(cfg, params, list(ids), n, Policy("h2o"), 12)
    np.testing.assert_allclose(np.asarray(mass)[1, :, 0, :, :n], h2o_mass, rtol=1e-4, atol=1e-5)
    mass = mass[0]
    _, want_mass, want_keep = brute_force(cfg, params, list(ids), n, policy, 12)
    np.testing.assert_allclose(np.asarray(mass)[:, 0, :, :n], want_mass, rtol=1e-4, atol=1e-5)
    assert not np.asarray(mass)[:, 0, :, n:].any()
    kept, kept_mass = jax.jit(policies.select, static_argnums=0)(policy, state, mass, jnp.array([12]))
    assert int(kept.cache.length[0]) == 12
    keys_LxKxCxD = np.asarray(kept.cache.keys)[:, 0]
    for l in range(cfg.num_layers):
        for h in range(cfg.num_kv_heads):
            slots = np.flatnonzero(want_keep[l, h])
            np.testing.assert_array_equal(keys_LxKxCxD[l, h, :12], np.asarray(state.cache.keys)[l, 0, h, slots])
            np.testing.assert_array_equal(np.asarray(kept_mass)[l, 0, h, :12], np.asarray(mass)[l, 0, h, slots])
            assert not keys_LxKxCxD[l, h, 12:].any() and not np.asarray(kept_mass)[l, 0, h, 12:].any()
    assert (want_keep[:, 0] != want_keep[:, 1]).any(), "the KV heads keep different slots"


def test_keep_rules_on_hand_made_mass():
    """What each rule keeps, on a mass made by hand: one row, 12 prompt slots, budget 6, two KV heads."""
    mass = jnp.zeros((1, 1, 2, 16)).at[0, 0, 0, 2].set(5.0).at[0, 0, 1, 5].set(5.0).at[0, 0, :, 3].set(1.0)
    n, b = jnp.array([12]), jnp.array([6])
    keep = lambda p, b=b: [np.flatnonzero(k).tolist() for k in np.asarray(p.keep(mass, n, b))[0, 0]]
    assert keep(Policy("window", sink=2)) == [[0, 1, 8, 9, 10, 11]] * 2
    assert keep(Policy("window", sink=4)) == [[0, 1, 2, 3, 10, 11]] * 2
    # h2o: the recent 3, then the 3 heaviest of slots 0..8 (ties: the earlier slot)
    assert keep(Policy("h2o")) == [[0, 2, 3, 9, 10, 11], [0, 3, 5, 9, 10, 11]]
    # snapkv, obs 3, kernel 3: the window 9..11, then the top 3 of the mass of slots 0..8 pooled over 3 slots
    assert keep(Policy("snapkv", obs=3, kernel=3)) == [[1, 2, 3, 9, 10, 11], [4, 5, 6, 9, 10, 11]]
    for kind in policies.POLICIES:
        assert keep(Policy(kind), jnp.array([12])) == [list(range(12))] * 2  # budget = prompt: everything
        assert keep(Policy(kind), jnp.array([1])) == [[0 if kind == "window" else 11]] * 2


def test_match_anchor_budget_is_the_anchor_cache_per_document(model):
    """--budget match-anchor gives each document exactly the slots its anchor cache holds."""
    reqs = _requests(model)
    anchor = scoring.Scorer(model, batch_size=2, chunk_size=8).run(reqs, "anchor")
    assert evaluate.item_budgets(reqs, "match-anchor", model.anchor_ids) == anchor.held_slots
    assert len(set(anchor.held_slots)) > 1
    n = [len(r.prefix) - 1 for r in reqs]
    assert evaluate.item_budgets(reqs, 0.5, model.anchor_ids) == [max(1, int(0.5 * x)) for x in n]


def test_evaluate_task_with_policies(model):
    """One task scored with full, anchor and every policy at the anchor's budgets: the same C↓ as the anchor."""
    doc = tasks.Doc("arc_easy", "test", 0, {})
    items = [
        tasks.MCItem("arc_easy", doc, (), pairs[0][0], ("",) * len(pairs), conts, tuple(c.strip() for c in conts), 0)
        for pairs in (ITEMS[0], ITEMS[2])
        for conts in [tuple(c for _, c in pairs)]
    ]
    caches = evaluate.parse_caches("full,anchor,window,snapkv,h2o", "match-anchor,0.5")
    assert caches[2:] == [f"{p}@{b}" for b in ("match-anchor", 0.5) for p in policies.POLICIES]
    out = evaluate.evaluate_task(scoring.Scorer(model, chunk_size=8), items, caches, timing=True)
    for name in caches[2:5]:
        assert out[name]["cache_slots"] == out["anchor"]["cache_slots"]
        assert out[name]["c_reduction"] == pytest.approx(out["anchor"]["c_reduction"])
        assert out[name]["t_vs_full"] > 0
    n = [len(model.encode_request(it.pairs()).prefix) - 1 for it in items]
    assert out["h2o@0.5"]["cache_slots"] == sum(x // 2 for x in n)


def test_sepllm_is_the_anchor_cache_of_its_scheme_and_exact(model):
    """Training-free SepLLM (separators, sinks, a window) scored through the cache equals one forward pass of
    context + continuation under its predicate (the recompute path) and holds exactly sinks + separators +
    open sentence + window."""
    reqs = _requests(model)
    scorer = scoring.Scorer(model, batch_size=2, chunk_size=8)
    sub = evaluate.sepllm_scorer(scorer, policies.SepLLM(window=3, sink=2))
    assert (sub.model.cfg.anchor_window, sub.model.cfg.anchor_rule, sub.runtime) == (3, "sepllm", scorer.runtime)
    cached, recomputed = sub.run(reqs, "anchor"), sub.run(reqs, "anchor", recompute=True)
    np.testing.assert_allclose(sum(cached.loglik, []), sum(recomputed.loglik, []), atol=1e-4)
    seps = sub.model.anchor_ids
    for r, held in zip(reqs, cached.held_slots):
        ids = r.prefix[:-1]
        last = max(i for i, t in enumerate(ids) if t in seps)
        assert held == sum(i < 2 or t in seps or i > last or i > len(ids) - 3 for i, t in enumerate(ids))


@pytest.mark.slow
def test_sepllm_row_of_evaluate_task(model):
    """`sepllm` is one more row of `evaluate_task` beside the other caches, on the same documents; its rule
    changes the scores (against the model's own anchor cache)."""
    scorer = scoring.Scorer(model, batch_size=2, chunk_size=8)
    doc = tasks.Doc("arc_easy", "test", 0, {})
    conts = tuple(c for _, c in ITEMS[0])
    items = [tasks.MCItem("arc_easy", doc, (), ITEMS[0][0][0], ("",) * 2, conts, tuple(c.strip() for c in conts), 0)]
    caches = evaluate.parse_caches("full,anchor,sepllm")
    out = evaluate.evaluate_task(scorer, items, caches, timing=False, policies={"sepllm": policies.SepLLM(3, 2)})
    alone = evaluate.sepllm_scorer(scorer, policies.SepLLM(3, 2)).run(_requests(model)[:1], "anchor")
    np.testing.assert_allclose(out["sepllm"]["loglik"][0], alone.loglik[0], atol=1e-5)
    assert np.abs(np.subtract(out["sepllm"]["loglik"][0], out["anchor"]["loglik"][0])).max() > 1e-3
    assert 0 < out["sepllm"]["c_reduction"] < 1


@pytest.fixture
def tiny_model_dir(tiny_params, tiny_tokenizer, tmp_path):
    """The tiny model as an HF directory without anchor settings."""
    return hf.save_hf_dir(*tiny_params, tiny_tokenizer, tmp_path / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--cache", "full,window", "--budget", "0"], "--budget"),
        (["--cache", "full,window", "--budget", "1.5"], "--budget"),
        (["--cache", "full,window", "--budget", "abc"], "--budget"),
        (["--cache", "full,streaming"], "--cache"),
        (["--cache", "full,window"], "--budget"),
        (["--cache", "full", "--budget", "0.5", "--perplexity"], "--budget applies to the policies"),
        (["--cache", "full,window", "--budget", "0.5", "--kernel", "4"], "odd kernel"),
        (["--cache", "full", "--budget", "0.5"], "--budget applies to the policies"),
        (["--cache", "full,window", "--budget", "match-anchor"], "--budget match-anchor) needs anchor settings"),
    ],
)
def test_bad_policy_input_is_one_line_exit_2(args, fragment, tiny_model_dir):
    cmd = [sys.executable, "-m", "anjax.evaluate", "--model", str(tiny_model_dir), "--data-dir", str(SLICES)]
    proc = subprocess.run([*cmd, "--tasks", "piqa", *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert_one_line_error(proc, fragment)


@pytest.mark.slow
def test_policies_report_resumes(tiny_model_dir, tmp_path, capsys):
    """`python -m anjax.report policies` evaluates through `anjax.evaluate`: rerun, it takes the saved task;
    `--no-timing` leaves out T↑."""
    argv = ["--model", str(tiny_model_dir), "--anchor-mode", "ep", "--tasks", "piqa", "--limit", "2"]
    argv += ["--budget", "match-anchor,0.5", "--no-timing", "--out-dir", str(tmp_path), "--name", "p"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tasks, "DEFAULT_DATA_DIR", SLICES)
        assert report.policies(argv) == 0
        first = json.loads((tmp_path / "p_eval.json").read_text())
        assert (tmp_path / "p_eval.tasks" / "piqa.json").is_file() and "already scored" not in capsys.readouterr().out
        assert report.policies(argv) == 0
    assert "piqa already scored" in capsys.readouterr().out
    assert json.loads((tmp_path / "p_eval.json").read_text())["tasks"] == first["tasks"]
    data = json.loads((tmp_path / "p.json").read_text())  # the report names its source report's provenance
    assert [s["command"].split()[:3] for s in data["provenance"]["sources"].values()] == [
        ["python", "-m", "anjax.evaluate"]
    ]
    rows = data["models"][next(iter(data["models"]))]
    assert "sepllm" in rows and {r["t_vs_full"] for r in rows.values()} == {None}  # --no-timing: no T↑ column
