"""benchmarks/window_long.py, issue #35's run after its A/B: it names the A/B's winner only once every arm reached
the last step, trains it with the long recipe plus the arm's overrides, and every evaluation it plans is one its
command accepts."""

from __future__ import annotations

import json

import pytest
from conftest import load_script

from anjax.cli import evaluate as evaluate_cli

window_long = load_script("benchmarks/window_long.py")
ARMS = {
    "ac": [],
    "ac-w64": ["anchors.window=64"],
    "sepllm-w64": ["anchors.mode=ep", 'anchors.tokens=[".", ","]', "anchors.rule=sepllm", "anchors.window=64"],
}


def _ab(tmp_path, last: dict[str, int]) -> str:
    """An A/B report: the EP arm has the lowest validation loss (it predicts no <AC>), ac-w64 the lowest text
    perplexity in its anchor cache."""
    losses, ppl = {"ac": 4.11, "ac-w64": 3.95, "sepllm-w64": 3.2}, {"ac": 47.3, "ac-w64": 29.3, "sepllm-w64": 31.0}
    rows = [
        {"arm": a, "step": min(last.values()), "last_step": last[a], "val_loss_anchor": losses[a], "val_loss_full": 3.5}
        | {"ppl_step": last[a], "ppl_anchor": ppl[a], "kept": 0.16}
        for a in sorted(last, key=ppl.get)
    ]
    path = tmp_path / "ab.json"
    path.write_text(json.dumps({"config": "configs/smollm2-135m-ac-long.yaml", "arms": ARMS, "rows": rows}))
    return str(path)


def test_the_winner_is_trained_at_the_long_budget_and_every_evaluation_parses(tmp_path, capsys):
    ab = _ab(tmp_path, {"ac": 100, "ac-w64": 100, "sepllm-w64": 100})
    assert window_long.main(["--ab", ab, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "winner of" in out and ": ac-w64 (held-out text perplexity in its anchor cache 29.30, 16.0% of" in out
    plan = window_long.stages("ac-w64", ARMS, "configs/smollm2-135m-ac-long.yaml", "runs/long")
    train = plan[0][1]
    assert train == [
        "train.py", "--config", "configs/smollm2-135m-ac-long.yaml", "--set", "run.dir=runs/long", "anchors.window=64"
    ]  # fmt: skip
    evaluations = [cmd[2:] for _, cmd, _ in plan if cmd[:2] == ["-m", "anjax.evaluate"]]
    assert len(evaluations) == 3  # base SepLLM, both models' perplexity
    for argv in evaluations:
        argv = [*argv[: argv.index("--out-dir")], "--out-dir", str(tmp_path), *argv[argv.index("--out-dir") + 2 :]]
        args = evaluate_cli.build_parser().parse_args(argv)
        evaluate_cli.check_args(args)
        assert args.policy_chunk == 1 or not args.perplexity
    assert "--tasks" in plan[-2][1] and "boolq" not in plan[-2][1][plan[-2][1].index("--tasks") + 1]


def test_an_unfinished_ab_or_a_wrong_stage_is_one_usage_error(tmp_path):
    ab = _ab(tmp_path, {"ac": 100, "ac-w64": 50, "sepllm-w64": 100})
    with pytest.raises(ValueError, match=r"the A/B is not complete: ac-w64 \(step 50\) short of step 100"):
        window_long.main(["--ab", ab, "--dry-run"])
    with pytest.raises(ValueError, match="--ab .*missing.json: no such file"):
        window_long.main(["--ab", str(tmp_path / "missing.json")])
    (tmp_path / "cli.json").write_text(json.dumps({"arms": ["ac"], "rows": []}))  # `anjax.report ab`'s: no overrides
    with pytest.raises(ValueError, match="not a report of benchmarks/ab_objectives.py"):
        window_long.main(["--ab", str(tmp_path / "cli.json")])
    ab = _ab(tmp_path, {"ac": 100, "ac-w64": 100, "sepllm-w64": 100})
    with pytest.raises(ValueError, match="--from 'bogus': one of train, base, policies, ppl, compare, pareto"):
        window_long.main(["--ab", ab, "--from", "bogus"])
