"""benchmarks/long_run_curve.py: the validation rows of a run, the power-law trend, bad input."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "long_run_curve", Path(__file__).resolve().parents[1] / "benchmarks" / "long_run_curve.py"
)
curve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curve)


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
    rows = curve.validation_rows(run / "metrics.jsonl", tokens_per_step=100)
    assert [r["step"] for r in rows] == [0, 10, 20, 40, 80]
    assert rows[1]["train_s"] is None and rows[1]["tokens"] == 1000
    rep = curve.report(rows, from_step=10, tail=2, target=1.1, run="r")
    for fit in rep["fits"].values():
        assert fit["a"] == pytest.approx(30.0, rel=1e-9) and fit["b"] == pytest.approx(0.4, rel=1e-9)
        assert fit["tokens_needed"] == pytest.approx((30.0 / math.log(1.1)) ** (1 / 0.4), rel=1e-9)
    assert curve.tokens_needed(1.0, -0.1, 0.1) is None  # a rising gap never reaches the target


def test_cli_writes_the_report(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert curve.main(["--run", str(run), "--from-step", "10", "--out-dir", str(tmp_path / "out")]) == 0
    assert "| 80 | 8,000 |" in capsys.readouterr().out
    for ext in ("md", "json", "png"):
        assert (tmp_path / "out" / f"long_run_curve.{ext}").stat().st_size > 0


def test_bad_run_is_one_line(tmp_path):
    run = _run_dir(tmp_path)
    (run / "metrics.jsonl").write_text('{"step": 0\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1: not JSON"):
        curve.main(["--run", str(run), "--out-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="no such file"):
        curve.main(["--run", str(tmp_path / "missing")])
