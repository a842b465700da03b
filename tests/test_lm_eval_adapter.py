"""The lm-evaluation-harness model "anjax" (anjax/eval/lm_eval_adapter.py): the harness scoring through it agrees
with `anjax.eval.evaluate`; rolling log-likelihoods and greedy generation equal full forward passes; the scorer and
the engine share one runtime and the weights; cache policies; model_args checked before anything loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_evaluate import SLICES, forward_logp

from anjax.eval import evaluate, tasks
from anjax.inference import scoring

REPO = Path(__file__).resolve().parent.parent


def harness_task(tmp_path, name, yaml_path, docs):
    """A copy of the harness's own task YAML that scores `docs` (a local jsonl file) and draws its
    demonstrations from them too, leaving out the scored document (fewshot split == test split)."""
    import yaml

    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(dict(d.fields)) + "\n" for d in docs))
    conf = {
        "include": str(yaml_path),
        "task": f"anjax_{name}",
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
        "fewshot_split": "test",
    }
    (tmp_path / f"anjax_{name}.yaml").write_text(yaml.safe_dump(conf))


@pytest.mark.slow
def test_lm_eval_adapter_agrees_with_builtin_evaluator(tiny, tmp_path, monkeypatch):
    """The harness itself (its arc_easy and winogrande YAMLs, 2-shot) scoring through the adapter
    gets the same prompts, log-likelihoods and accuracies as `anjax.eval.evaluate`."""
    pytest.importorskip("lm_eval")
    import lm_eval.tasks

    from anjax.eval.lm_eval_adapter import AnjaxLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ep")
    harness = Path(lm_eval.__file__).parent / "tasks"
    docs = {
        "arc_easy": tasks.load_task("arc_easy", SLICES, limit=6),
        "winogrande": tasks.load_task("winogrande", SLICES, limit=6),
    }
    harness_task(tmp_path, "arc_easy", harness / "arc" / "arc_easy.yaml", docs["arc_easy"])
    harness_task(tmp_path, "winogrande", harness / "winogrande" / "default.yaml", docs["winogrande"])
    manager = lm_eval.tasks.TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = AnjaxLM(scoring_model=model, cache="anchor", batch_size=4)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["anjax_arc_easy", "anjax_winogrande"],
        task_manager=manager,
        num_fewshot=2,
        log_samples=True,
        bootstrap_iters=0,
    )
    scorer = scoring.Scorer(model, batch_size=4)
    for name, task_docs in docs.items():
        items = tasks.build_requests(name, task_docs, shots=2, pool=task_docs)
        ours = evaluate.evaluate_task(scorer, items, ["anchor"], timing=False)["anchor"]
        samples = sorted(res["samples"][f"anjax_{name}"], key=lambda s: s["doc_id"])
        assert [[tuple(a) for a in s["arguments"]] for s in samples] == [it.pairs() for it in items]
        np.testing.assert_allclose(
            [r[0][0] for s in samples for r in s["resps"]], [x for ll in ours["loglik"] for x in ll], atol=1e-4
        )
        for metric in ("acc", "acc_norm"):
            if metric in ours:
                assert res["results"][f"anjax_{name}"][f"{metric},none"] == pytest.approx(ours[metric])


@pytest.mark.slow
def test_lm_eval_adapter_rolling_loglikelihood(tiny):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from anjax.eval.lm_eval_adapter import AnjaxLM

    cfg, params, tok = tiny
    lm = AnjaxLM(scoring_model=scoring.scoring_model(cfg, params, tok), cache="full")
    text = "The cat sat on the mat. Did the dog see it?"
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    logp = forward_logp(cfg, params, ids, (), True)
    assert got == pytest.approx(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))), abs=2e-4)


def test_lm_eval_adapter_scorer_and_engine_share_one_runtime_and_the_weights(tiny, monkeypatch):
    """One `Runtime` is made (the scorer's), the engine uses it, and it holds the scoring model's arrays
    themselves: the embedding and final norm always, the layers too unless its decode is split (CPU), where it
    holds them per layer and fused, the same values."""
    pytest.importorskip("lm_eval")
    from anjax.core.params import fuse_projections, with_scan_layers
    from anjax.eval.lm_eval_adapter import AnjaxLM
    from anjax.inference.runtime import Runtime

    made, original = [], Runtime.__init__
    monkeypatch.setattr(Runtime, "__init__", lambda self, *a: (made.append(self), original(self, *a))[1])
    cfg, params, tok = tiny
    lm = AnjaxLM(scoring_model=scoring.scoring_model(cfg, params, tok, anchor_mode="ep"), cache="anchor")
    engine = lm.engine()
    assert lm.engine() is engine and engine.runtime is lm.scorer.runtime and made == [lm.scorer.runtime]
    weights = lm.model.params
    shared = [k for k in weights if k != "layers"]
    assert shared and all(
        a is b for k in shared for a, b in zip(jax.tree.leaves(engine.params[k]), jax.tree.leaves(weights[k]))
    )
    if not engine.spec.split_layers:
        assert all(a is b for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(weights)))
        return
    _, expected = fuse_projections(*with_scan_layers(lm.model.cfg, weights, False))
    assert jax.tree.structure(engine.params) == jax.tree.structure(expected)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(engine.params), jax.tree.leaves(expected)))


@pytest.mark.slow
def test_lm_eval_adapter_generate_until(tiny):
    """Greedy continuations equal the argmax chain of full forward passes (anchor mask), cut at `until`."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from anjax.eval.lm_eval_adapter import AnjaxLM

    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ep")
    lm = AnjaxLM(scoring_model=model, cache="anchor")
    contexts = ["The cat sat on the mat. Did the dog", "Yes! The dog saw"]
    full = lm.generate_until(
        [Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 6}), i) for i, c in enumerate(contexts)]
    )
    for context, text in zip(contexts, full):
        ids = model.encode_context(context)
        for _ in range(6):
            ids.append(int(forward_logp(cfg, params, ids, model.anchor_ids, False)[-1].argmax()))
        assert text == tok.decode(ids[len(model.encode_context(context)) :])
    stop = full[0][2:4]
    cut = lm.generate_until([Instance("generate_until", {}, (contexts[0], {"until": [stop], "max_gen_toks": 6}), 0)])
    assert cut == [full[0][: full[0].find(stop)]]


def test_lm_eval_adapter_with_a_cache_policy(tiny):
    """cache=h2o,budget=...: loglikelihood is the scorer's h2o path at the items' budgets (match-anchor: the anchor
    cache's slots), the rolling log-likelihood streams token by token, generation keeps the budget; bad model_args
    are refused before anything loads."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from anjax.eval.lm_eval_adapter import AnjaxLM
    from anjax.inference.policies import Policy

    cfg, params, tok = tiny
    model = scoring.scoring_model(cfg, params, tok, anchor_mode="ep")
    pairs = [("The cat sat on the mat. Did the dog see it? Yes! The dog", c) for c in (" ran.", " sat")]
    reqs = [Instance("loglikelihood", {}, p, i, metadata=("t", 0, None)) for i, p in enumerate(pairs)]
    scorer = scoring.Scorer(model)
    items = [scoring.ScoreRequest.from_ids([model.encode_pair(*p) for p in pairs])]
    for budget in ("match-anchor", "0.5"):
        lm = AnjaxLM(scoring_model=model, cache="h2o", budget=budget)
        got = [x for x, _ in lm.loglikelihood(reqs)]
        want = scorer.run_paths(items, [(Policy("h2o"), evaluate.item_budgets(items, lm.budget, model.anchor_ids))])
        np.testing.assert_allclose(got, want[0].loglik[0], rtol=1e-6)
    text = "The cat sat on the mat. Did the dog see it? Yes! The dog saw the cat."
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    row = [tok.bos_token_id] + model.encode_text(text)[int(model.add_bos) :]
    by_token = scoring.Scorer(model, chunk_size=1).sequence_nll([row], Policy("h2o"), budgets=[(len(row) - 1) // 2])
    assert rolling == pytest.approx(-by_token["nll"][0], rel=1e-6)
    (gen,) = lm.generate_until([Instance("generate_until", {}, (text, {"until": [], "max_gen_toks": 4}), 0)])
    assert isinstance(gen, str) and lm.engine().spec.policy == Policy("h2o")
    with pytest.raises(ValueError, match="match-anchor is for scoring"):
        AnjaxLM(scoring_model=model, cache="h2o", budget="match-anchor").engine()
    for args, fragment in [
        (dict(cache="h2o"), "budget"),
        (dict(cache="full", budget="0.5"), "budget"),
        (dict(cache="h2o", budget="2"), "fraction"),
        (dict(cache="lru", budget="0.5"), "cache must be one of"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            AnjaxLM(scoring_model=model, **args)


def test_the_lm_eval_adapter_checks_its_dtype_model_arg():
    pytest.importorskip("lm_eval")
    from anjax.eval.lm_eval_adapter import check_model_args

    check_model_args(None, "full", 8, 128, {}, "bfloat16")
    with pytest.raises(ValueError, match="model_args dtype must be one of float32, bfloat16, got 'float16'"):
        check_model_args(None, "full", 8, 128, {}, "float16")


ADAPTER_ON_A_MESH = """
import json, sys
from lm_eval.api.instance import Instance
from anjax.eval.lm_eval_adapter import AnjaxLM

pairs = [("The cat sat on the mat. Did the dog", " see it?"), ("The cat sat on the mat. Did the dog", " run."),
         ("It rained. We stayed in", " all day."), ("One. Two. Three", " four.")]
reqs = [Instance("loglikelihood", {}, p, i, metadata=("t", i // 2, 0)) for i, p in enumerate(pairs)]
out = {}
for mesh in (None, "data=2:tensor=2"):
    lm = AnjaxLM(model=sys.argv[1], cache="anchor", anchor_mode="ep", mesh=mesh, batch_size=2)
    m = lm.model.mesh
    out[str(mesh)] = {"ll": lm.loglikelihood(reqs), "mesh": None if m is None else dict(m.shape)}
print(json.dumps(out))
"""


@pytest.mark.slow  # 4 simulated devices in a subprocess
def test_lm_eval_adapter_mesh_model_arg_gives_one_devices_loglikelihoods(tiny_model_dir):
    """model_args mesh=data=2:tensor=2 (the CLI's --mesh parser) scores over 4 devices as one device does."""
    pytest.importorskip("lm_eval")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-c", ADAPTER_ON_A_MESH, str(tiny_model_dir)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    one, mesh = got["None"], got["data=2:tensor=2"]
    assert one["mesh"] is None and mesh["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2}
    np.testing.assert_allclose([x for x, _ in mesh["ll"]], [x for x, _ in one["ll"]], rtol=0, atol=1e-5)
    assert [g for _, g in mesh["ll"]] == [g for _, g in one["ll"]]


def test_lm_eval_adapter_bad_mesh_model_arg_is_refused():
    pytest.importorskip("lm_eval")
    from anjax.eval.lm_eval_adapter import AnjaxLM

    with pytest.raises(ValueError, match="model_args mesh: expected data=D,tensor=T .* data=D:tensor=T"):
        AnjaxLM(mesh="data=2,tensor")
