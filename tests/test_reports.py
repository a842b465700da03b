"""`python -m anjax.report`: curve (a run's held-out curve and trend), compare (paired differences between two
models' reports) and ab (A/B arms at equal wall-clock; benchmarks/ab_objectives.py runs the arms)."""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

from anjax.cli import report
from anjax.eval import compare, intervals, pareto, policy_report
from anjax.train import ab, curves

ab_script = load_script("benchmarks/ab_objectives.py")


def _run_dir(tmp_path: Path, a: float = 30.0, b: float = 0.4) -> Path:
    """A run whose gap follows a · tokens^−b exactly (100 tokens per step), with a resumed duplicate row."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  batch_size: 2\n  seq_len: 50\n")
    lines = [{"step": 0, "val_loss_full": 4.0, "val_loss_anchor": 7.0}]
    for step in (10, 20, 40, 80):
        lines.append({"step": step, "loss": 3.0, "lr": 1e-4})
        lines.append({"step": step, "val_loss_full": 3.0, "val_loss_anchor": 9.9, "train_s": step})  # resumed over
        lines.append({"step": step, "val_loss_full": 3.0, "val_loss_anchor": 3.0 + a * (100 * step) ** -b})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return run


def test_rows_keep_the_last_validation_per_step_and_the_fit_recovers_a_power_law(tmp_path):
    run = _run_dir(tmp_path)
    rows = curves.validation_rows(run / "metrics.jsonl", tokens_per_step=100)
    assert [r["step"] for r in rows] == [0, 10, 20, 40, 80]
    assert rows[1]["train_s"] is None and rows[1]["tokens"] == 1000
    rep = curves.report(rows, from_step=10, tail=2, target=1.1, run="r")
    for fit in rep["fits"].values():
        assert fit["a"] == pytest.approx(30.0, rel=1e-9) and fit["b"] == pytest.approx(0.4, rel=1e-9)
        assert fit["tokens_needed"] == pytest.approx((30.0 / math.log(1.1)) ** (1 / 0.4), rel=1e-9)
    assert curves.tokens_needed(1.0, -0.1, 0.1) is None  # a rising gap never reaches the target


def test_cli_writes_the_report(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert report.main(["curve", "--run", str(run), "--from-step", "10", "--out-dir", str(tmp_path / "out")]) == 0
    assert "| 80 | 8,000 |" in capsys.readouterr().out
    for ext in ("md", "json", "png"):
        assert (tmp_path / "out" / f"long_run_curve.{ext}").stat().st_size > 0


def test_bad_run_is_one_line(tmp_path):
    run = _run_dir(tmp_path)
    (run / "metrics.jsonl").write_text('{"step": 0\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1: not JSON"):
        report.main(["curve", "--run", str(run), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="no such file"):
        report.main(["curve", "--run", str(tmp_path / "missing")])


def _report(model: str, seed: int, ids=None) -> dict:
    """An evaluate report of two tasks x 40 documents, caches full and anchor, with its intervals."""
    rng = np.random.default_rng(seed)
    tasks = {}
    for t in ("a", "b"):
        ids_t = list(range(40)) if ids is None else ids
        tasks[t] = {
            c: dict(n=40, doc_ids=ids_t, acc_per_doc=rng.integers(0, 2, 40).tolist()) for c in ("full", "anchor")
        }
    return intervals.add_accuracy_intervals(dict(model=model, caches=["full", "anchor"], tasks=tasks, anchor_mode="ac"))


def test_compare_pairs_documents_and_matches_a_reports_own_differences(tmp_path):
    rep = _report("m", 0)
    same = compare.paired(rep, rep, [("anchor", "full"), ("full", "full")])
    own = rep["differences"]["anchor - full"]
    assert same["anchor - full"]["average"]["ci"] == own["average"]["acc_ci"]
    assert same["full - full"]["average"] == dict(diff=0.0, ci=[0.0, 0.0])
    new = _report("new", 1)
    diffs = compare.paired(new, rep, [("anchor", "full")])
    x = [
        np.mean(new["tasks"][t]["anchor"]["acc_per_doc"]) - np.mean(rep["tasks"][t]["full"]["acc_per_doc"])
        for t in "ab"
    ]
    assert diffs["anchor - full"]["average"]["diff"] == pytest.approx(np.mean(x))
    with pytest.raises(ValueError, match="different documents"):
        compare.paired(_report("other", 1, ids=list(range(1, 41))), rep, [("anchor", "full")])
    one = compare.paired(new, rep, [("anchor", "full")], only=["b"])["anchor - full"]
    assert list(one["tasks"]) == ["b"] and one["average"]["diff"] == pytest.approx(x[1])
    with pytest.raises(ValueError, match="no 'h2o' results"):
        compare.paired(new, rep, [("h2o", "full")])
    for name, r in (("new", new), ("base", {"accuracy": rep})):  # a quality report holds the evaluate report
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    argv = ["--new", str(tmp_path / "new.json"), "--base", str(tmp_path / "base.json"), "--out-dir", str(tmp_path)]
    assert report.main(["compare", *argv]) == 0
    data = json.loads((tmp_path / "compare_models.json").read_text())
    assert data["differences"].keys() == set("full - full,anchor - full,anchor - anchor".split(","))
    assert data["provenance"]["command"].startswith("python -m anjax.report compare --new")
    assert data["provenance"]["sources"] == {"new": None, "base": None}  # these reports carry none


def test_ab_arm_values_may_hold_commas():
    """An arm's overrides split at commas before `key.path=` only: SepLLM's separator list stays one value."""
    arm = 'sep=anchors.mode=ep,anchors.tokens=[".", ",", ";"],anchors.window=64'
    assert ab_script.parse_arm(arm) == (
        "sep",
        ["anchors.mode=ep", 'anchors.tokens=[".", ",", ";"]', "anchors.window=64"],
    )
    assert ab_script.parse_arm("ac=") == ("ac", [])
    with pytest.raises(SystemExit, match="--arm expects"):
        ab_script.parse_arm("no-overrides")


def test_ab_measures_each_finished_arm_once(tmp_path, monkeypatch, capsys):
    """`ab_objectives.py --ppl ARGS` measures an arm's held-out text perplexity once it reached its last step, and
    not again once OUT/NAME.ppl.json is there."""
    calls = []
    monkeypatch.setattr(
        ab_script.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or argparse.Namespace(returncode=0)
    )
    (tmp_path / "arm").mkdir()
    (tmp_path / "arm" / "config.yaml").write_text("train:\n  steps: 4\n")
    metrics = tmp_path / "arm" / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    ab_script.measure(tmp_path, "arm", "--limit 16 --seq-len 512")
    assert calls == []  # not finished
    metrics.write_text(metrics.read_text() + json.dumps({"step": 4, "loss": 1.0}) + "\n")
    ab_script.measure(tmp_path, "arm", "--limit 16 --seq-len 512")
    assert calls[0][1:] == [
        "-m", "anjax.evaluate", "--perplexity", "--model", str(tmp_path / "arm"), "--cache", "full,anchor",
        "--limit", "16", "--seq-len", "512", "--out-dir", str(tmp_path), "--name", "arm.ppl",
    ]  # fmt: skip
    (tmp_path / "arm.ppl.json").write_text("{}")
    ab_script.measure(tmp_path, "arm", "--limit 16")
    assert len(calls) == 1
    capsys.readouterr()


def test_ab_report_compares_arms_at_the_common_end_of_the_clock(tmp_path, capsys):
    """Each arm is read at its last validation within the shortest arm's clock; `python -m anjax.report ab`
    finds the arms below --out and writes ab.{md,json,png}."""
    for arm, (slope, seconds) in {"fast": (0.2, [0, 10, 20, 30]), "slow": (0.1, [0, 15, 25])}.items():
        (tmp_path / arm).mkdir()
        lines = [
            {"step": i, "train_s": t, "val_loss_full": 3.0, "val_loss_anchor": 5.0 - slope * i}
            for i, t in enumerate(seconds)
        ]
        (tmp_path / arm / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = ab.summarize(ab.curves(tmp_path, ["fast", "slow"]))
    assert [(r["arm"], r["step"], r["train_s"]) for r in rows] == [("fast", 2, 20), ("slow", 2, 25)]
    assert rows[0]["val_loss_anchor"] == pytest.approx(4.6) and rows[0]["full_change"] == 0.0
    assert report.main(["ab", "--out", str(tmp_path)]) == 0
    assert "| fast | 2 | 20 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "ab.json").read_text())["arms"] == ["fast", "slow"]
    assert (tmp_path / "ab.png").stat().st_size > 0


def test_ab_report_on_the_step_clock_compares_at_the_shortest_arms_last_step(tmp_path):
    """Arms run one after another (`ab_objectives.py --sequential`) compare at equal steps, whatever their seconds;
    the winner is named once every arm reached the last step."""
    for arm, (steps, seconds) in {"done": ([0, 25, 50, 75], [0, 9, 18, 27]), "cut": ([0, 25, 50], [0, 30, 60])}.items():
        (tmp_path / arm).mkdir()
        lines = [
            {"step": i, "train_s": t, "val_loss_full": 3.0, "val_loss_anchor": 5.0 - 0.01 * i}
            for i, t in zip(steps, seconds)
        ]
        (tmp_path / arm / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = ab.summarize(ab.curves(tmp_path, ["done", "cut"]), "step")
    assert [(r["arm"], r["step"], r["last_step"]) for r in rows] == [("done", 50, 75), ("cut", 50, 50)]
    assert report.main(["ab", "--out", str(tmp_path), "--clock", "step"]) == 0
    data = json.loads((tmp_path / "ab.json").read_text())
    assert data["clock"] == "step" and data["provenance"]["command"].startswith("python -m anjax.report ab")
    with pytest.raises(ValueError, match=r"not complete: cut \(step 50\), new \(not started\) short of step 75"):
        ab.winner(rows, ["done", "cut", "new"])
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # the last arm reaches step 75, below "done"
        f.write(json.dumps({"step": 75, "train_s": 90, "val_loss_full": 3.0, "val_loss_anchor": 4.2}) + "\n")
    rows = ab.summarize(ab.curves(tmp_path, ["done", "cut"]), "step")
    with pytest.raises(ValueError, match="no held-out perplexity at step 75 .* of cut, done"):
        ab.winner(rows, ["done", "cut"])
    # measured on text, "done" is ahead although "cut" has the lower validation loss (e.g. it predicts <AC>)
    for arm, anchor_ppl in (("done", 20.0), ("cut", 30.0)):
        measured = {
            "results": {
                "full": {"ppl": 18.0, "ppl_ci": [17.0, 19.0], "c_reduction": 0.0, "tokens": 900},
                "anchor": {
                    "ppl": anchor_ppl,
                    "ppl_ci": [anchor_ppl - 1, anchor_ppl + 1],
                    "c_reduction": 0.75,
                    "tokens": 900,
                },
            },
            "ratios": {"anchor / full": {"ppl_ratio": anchor_ppl / 18, "ppl_ratio_ci": [1.0, 2.0]}},
            "provenance": {"models": {"model": {"training_step": 75}}},
        }
        (tmp_path / f"{arm}.ppl.json").write_text(json.dumps(measured))
    assert ab.winner(ab.write_report(tmp_path, ["cut", "done"], "step"), ["done", "cut"]) == "done"
    text = (tmp_path / "ab.md").read_text()
    assert "| text ppl full | text ppl anchor | anchor / full | KV kept |" in text
    assert (
        text.index("| done |") < text.index("| cut |")
        and "| 20.00 [19.00, 21.00] | 1.111 [1.000, 2.000] | 25.0% |" in text
    )


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_pareto_fronts_of_the_long_anllm_ac_and_every_method(tmp_path, capsys):
    """On the long AnLLM-AC's committed reports the fronts are the points no other point beats at no more KV
    (checked by hand against the tables); the anchor cache is on neither. `python -m anjax.report pareto` writes
    them with both models; a --model without a report is one usage error."""
    acc = compare.load_report(RESULTS / "policies_anllm_ac_eval.json")
    ppl = pareto.load_perplexity(RESULTS / "ppl_policies_anllm_ac_chunk32.json")
    pts = pareto.points(acc, ppl)
    fronts = {m: {p["cache"] for p in ps if p["front"]} for m, ps in pts.items()}
    assert fronts == {
        "acc": {"window@0.05", "h2o@0.1", "h2o@0.2", "snapkv@0.5", "full"},
        "ppl_ratio": {"snapkv@match-anchor", "h2o@0.1", "full"},
    }
    anchor = next(p for p in pts["acc"] if p["cache"] == "anchor")
    assert anchor["kept"] == pytest.approx(0.3438, abs=1e-4) and anchor["value"] == pytest.approx(0.4375)
    base = f"base={RESULTS / 'policies_smollm2_eval.json'}"
    argv = [
        "pareto",
        "--model",
        f"ac={RESULTS / 'policies_anllm_ac_eval.json'},{RESULTS / 'ppl_policies_anllm_ac_chunk32.json'}",
    ]
    assert report.main([*argv, "--model", base, "--out-dir", str(tmp_path), "--name", "p"]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert set(data["models"]) == {"ac", "base"} and data["models"]["base"]["ppl_ratio"] == []
    assert "| h2o | 0.2 | 18.4% | 44.8 [42.5, 47.1] | yes |" in (tmp_path / "p.md").read_text()
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--model expects NAME=EVAL.json"):
        report.main(["pareto", "--model", "ac=", "--out-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="not an anjax.evaluate --perplexity report"):
        pareto.load(f"ac={RESULTS / 'policies_anllm_ac_eval.json'},{RESULTS / 'policies_anllm_ac_eval.json'}")
    capsys.readouterr()


def _subset(rep: dict, caches: list[str]) -> dict:
    """The report of only `caches` (as if evaluated with --cache of those)."""
    tasks = {t: {c: rows[c] for c in caches} for t, rows in rep["tasks"].items()}
    return {**rep, "caches": caches, "tasks": tasks, "average": {c: rep["average"][c] for c in caches}}


def test_reports_of_one_model_merge_into_the_report_of_all_its_caches(tmp_path, capsys):
    """A cache evaluated later (e.g. training-free SepLLM) joins the earlier report: the base model's committed
    report split in two (the full cache in both) merges back to the same summary; other documents, another
    model or a shared cache scored differently are refused; `policies --reports A+B` reports one model."""
    rep = compare.load_report(RESULTS / "policies_smollm2_eval.json")
    a, b = _subset(rep, rep["caches"][:5]), _subset(rep, ["full", *rep["caches"][5:]])
    b["anchor_scheme"] = {**rep["anchor_scheme"], "window": 0, "rule": "ansan"}  # written after the fields came
    merged = compare.merge([a, b], ["a", "b"])
    assert merged["caches"] == rep["caches"] and merged["merged_from"] == ["a", "b"]
    assert policy_report.summary(merged) == policy_report.summary(rep)
    other_docs = json.loads(json.dumps(b))
    other_docs["tasks"]["boolq"]["h2o@0.5"]["doc_ids"][0] = -1
    with pytest.raises(ValueError, match="b: task boolq scored other documents"):
        compare.merge([a, other_docs], ["a", "b"])
    with pytest.raises(ValueError, match="b: its model 'other' differs"):
        compare.merge([a, {**b, "model": "other"}], ["a", "b"])
    with pytest.raises(ValueError, match="b: its anchor scheme .* differs"):
        compare.merge([a, {**b, "anchor_scheme": {**b["anchor_scheme"], "window": 64}}], ["a", "b"])
    flipped = json.loads(json.dumps(b))
    acc = flipped["tasks"]["piqa"]["full"]["acc_per_doc"]
    acc[:10] = [1 - x for x in acc[:10]]  # 5% of 200 documents
    with pytest.raises(ValueError, match="task piqa, cache full: 10 of 200 documents scored differently"):
        compare.merge([a, flipped], ["a", "b"])
    for name, r in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    spec = f"{tmp_path / 'a.json'}+{tmp_path / 'b.json'}"
    assert report.main(["policies", "--no-run", "--reports", spec, "--out-dir", str(tmp_path), "--name", "p"]) == 0
    data = json.loads((tmp_path / "p.json").read_text())
    assert list(data["models"]) == ["SmolLM2-135M-Instruct (a+b)"]
    assert data["models"]["SmolLM2-135M-Instruct (a+b)"] == policy_report.summary(rep)
    with pytest.raises(ValueError, match=r"--reports: no such file .*missing.json"):
        report.main(["policies", "--no-run", "--reports", f"{tmp_path / 'a.json'}+{tmp_path / 'missing.json'}"])
    capsys.readouterr()


def test_unknown_report_is_a_usage_error():
    with pytest.raises(
        ValueError, match="unknown report 'bogus': one of quality, policies, compare, curve, ab, pareto"
    ):
        report.main(["bogus"])
