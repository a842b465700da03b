"""`anjax.aot.serve.max_slots`: the search for the most server slots that fit, against a stand-in compiler whose
memory is affine up to a batch and then jumps (as TPU temporaries do), and its continuation of an unbracketed
search (`earlier`): the compiles already made are not made again and the answer ends bracketed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_checks import assert_one_line_error

from anjax.aot import serve
from anjax.core.config import tiny_config

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30
TARGET = SimpleNamespace(hbm_bytes=16 * GiB)  # all the search reads of a target


def total_bytes(batch: int, jump_at: int) -> float:
    """The stand-in compiler's total: 2 GiB of weights + 0.047 GiB a row, 2.5x that from `jump_at` rows on."""
    return (2 * GiB + batch * 0.047 * GiB) * (2.5 if batch >= jump_at else 1.0)


def fake_compiler(monkeypatch, jump_at: int) -> list[int]:
    """serving_report's stand-in (`total_bytes`). Returns the batches compiled, in order."""
    compiled: list[int] = []

    def report(step, cfg, target, mesh_sizes, batch, capacity, *_):
        compiled.append(batch)
        total = total_bytes(batch, jump_at)
        fits = total <= TARGET.hbm_bytes
        out = {"batch": batch, "fits": fits, "argument_bytes_by_group": {"params": 2 * GiB, "state": batch}}
        temps = f"{(total - 2 * GiB) / GiB:.3f}G"  # what a refusing TPU compiler prints
        error = [f"Ran out of memory: {temps} required for HLO temporaries ({temps}) exceeds the limit"]
        return out | ({"total_bytes": total} if fits else {"compiler_error": error})

    monkeypatch.setattr(serve, "serving_report", report)
    return compiled


@pytest.mark.parametrize("jump_at", [10_000, 231])  # memory affine throughout / temporaries jump at batch 231
def test_the_search_ends_bracketed_or_continues_to_the_bracket(monkeypatch, jump_at):
    cfg, target, mesh = tiny_config(), TARGET, {"data": 1, "tensor": 8}
    compiled = fake_compiler(monkeypatch, jump_at)
    want = max(b for b in range(1, 1000) if total_bytes(b, jump_at) <= TARGET.hbm_bytes)
    assert want == (297 if jump_at > 1000 else 230)
    result = serve.max_slots(cfg, target, mesh, 63, anchor_cache=True)
    while not result["bracketed"]:  # MAX_SEARCH_COMPILES spent: continue where it stopped
        before = len(compiled)
        result = serve.max_slots(cfg, target, mesh, 63, anchor_cache=True, earlier=result)
        assert set(compiled[before:]).isdisjoint(compiled[:before])  # nothing compiled twice
    assert result["max_batch"] == want and result["fits"] and result["batch"] == want
    assert {t["batch"]: t["fits"] for t in result["search"]}[want + 1] is False
    assert len(compiled) <= 10


@pytest.mark.slow  # python -m anjax.aot in a subprocess
def test_slots_from_a_file_that_is_no_slots_report_is_refused_in_one_line(tmp_path):
    junk = tmp_path / "train.json"
    junk.write_text(json.dumps({"steps": [{"step": "train"}]}))
    cmd = [sys.executable, "-m", "anjax.aot", "--config", "configs/tiny.yaml", "--topology", "v5e:2x2"]
    cmd += ["--step", "slots"]
    for path, message in (
        (junk, "not a `python -m anjax.aot --step slots --json` report"),
        (tmp_path / "no", "no such file"),
    ):
        proc = subprocess.run([*cmd, "--slots-from", str(path)], cwd=ROOT, capture_output=True, text=True)
        assert_one_line_error(proc, f"--slots-from {path}", message)
