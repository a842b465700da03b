"""infer.py end to end (subprocess, tiny model exported with a tiny tokenizer): outputs and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from cli_checks import assert_one_line_error

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.io import hf

pytestmark = pytest.mark.slow  # infer.py in subprocesses

INFER = str(Path(__file__).resolve().parents[1] / "infer.py")
STATS = {
    "prompt_tokens",
    "generated_tokens",
    "peak_cache_slots",
    "full_cache_slots",
    "cache_reduction",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
}


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    cfg = tiny_config(vocab_size=len(tiny_tokenizer))
    return hf.save_hf_dir(cfg, init_params(cfg, jax.random.key(0)), tiny_tokenizer, tmp_path / "model")


def infer(*args, cwd=None):
    return subprocess.run(
        [sys.executable, INFER, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "  "], "--prompt is empty"),
        (["--prompt", "The cat.", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--max-new-tokens", "4"], "either --prompt"),
        (["--input", "x.jsonl"], "--input needs --output"),
        (["--prompt", "The cat.", "--cache", "h2o"], "needs a budget"),
        (["--prompt", "The cat.", "--cache", "window", "--budget", "0"], "needs a budget"),
        (["--prompt", "The cat.", "--cache", "window", "--budget", "x"], "--budget"),
        (["--prompt", "The cat.", "--cache", "full", "--budget", "0.5"], "apply to the cache policies"),
        (["--prompt", "The cat.", "--cache", "lru"], "cache must be one of"),
    ],
)
def test_invalid_run_is_one_line_exit_2(args, message):
    assert_one_line_error(infer(*args), message)


def test_prompt_json_anchor_cache(model_dir):
    proc = infer(
        "--model",
        model_dir,
        "--prompt",
        "The cat sat on the mat. Did the dog see it? Yes",
        "--max-new-tokens",
        "5",
        "--anchor-mode",
        "ep",
        "--json",
        "--chunk-size",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"prompt_ids", "generated_ids", "text", "stats"}
    assert len(out["generated_ids"]) <= 5 and STATS <= set(out["stats"])
    assert out["stats"]["cache"] == "anchor" and out["stats"]["peak_cache_slots"] < out["stats"]["full_cache_slots"]


def test_protected_parts_of_a_prompt(model_dir, tmp_path):
    prompt = "The cat sat on the mat. Did the dog see it? Yes"
    proc = infer(
        "--model",
        model_dir,
        "--prompt",
        prompt,
        "--protect",
        "the mat",
        "--protect",
        "dog",
        "--max-new-tokens",
        "3",
        "--anchor-mode",
        "ep",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["stats"]["protected_tokens"] >= 3
    assert_one_line_error(infer("--model", model_dir, "--prompt", prompt, "--protect", "bird"), "'bird'")
    lines = [json.dumps({"prompt": prompt, "protect": ["dog"]}), json.dumps({"prompt": prompt, "protect": ["bird"]})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = infer(
        "--model",
        model_dir,
        "--input",
        tmp_path / "in.jsonl",
        "--output",
        out,
        "--max-new-tokens",
        "3",
        "--anchor-mode",
        "ep",
    )
    assert proc.returncode == 1 and "in.jsonl:2:" in proc.stderr, proc.stderr
    good, bad = [json.loads(x) for x in out.read_text().splitlines()]
    assert good["stats"]["protected_tokens"] >= 1 and '"protect"' in bad["error"]


def test_unknown_anchor_token(model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    (tmp_path / "in.jsonl").write_text('{"prompt": "The cat."}\n')
    proc = infer(
        "--model",
        model_dir,
        "--input",
        tmp_path / "in.jsonl",
        "--output",
        out,
        "--anchor-mode",
        "ep",
        "--anchors",
        "xylophone",
        "--max-new-tokens",
        "3",
    )
    assert_one_line_error(proc, "xylophone", "not one token in running text")
    assert not out.exists()


def test_prompt_that_cannot_fit(model_dir):
    proc = infer(
        "--model",
        model_dir,
        "--prompt",
        "The cat sat on the mat and the dog saw the cat " * 3,
        "--max-new-tokens",
        "3",
        "--cache",
        "full",
        "--capacity",
        "8",
    )
    assert_one_line_error(proc, "prompt 0", "capacity is 8")


def test_jsonl_round_trip_with_bad_lines(model_dir, tmp_path):
    lines = [
        '{"id": "a", "prompt": "The cat sat."}',
        "{not json",
        '{"id": 7, "prompt": ""}',
        "",
        '{"prompt": "Did the dog see it? Yes, the dog saw the cat"}',
        '["a list"]',
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "sub" / "out.jsonl"
    proc = infer(
        "--model",
        model_dir,
        "--input",
        tmp_path / "in.jsonl",
        "--output",
        out,
        "--max-new-tokens",
        "4",
        "--batch-size",
        "2",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "1",
    )
    assert proc.returncode == 1, proc.stderr
    for n in (2, 3, 6):
        assert f"in.jsonl:{n}:" in proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r.get("line") for r in records] == [None, 2, 3, None, 6]
    good = [r for r in records if "error" not in r]
    assert [r["id"] for r in good] == ["a", 5]
    for r in good:
        assert set(r) == {"id", "prompt", "text", "ids", "stats"} and STATS <= set(r["stats"])
        assert r["stats"]["prompt_tokens"] + r["stats"]["generated_tokens"] == len(r["ids"])
    assert "malformed JSON" in records[1]["error"] and "empty" in records[2]["error"]
    assert not [p for p in out.parent.iterdir() if p.name != "out.jsonl"]  # no temporary file left


def test_prompt_json_policy_cache(model_dir):
    """--cache h2o --budget 0.5: the row keeps half of its fed prompt tokens (its budget) to the end."""
    prompt = "The cat sat on the mat. Did the dog see it? Yes"
    proc = infer(
        "--model", model_dir, "--prompt", prompt, "--max-new-tokens", "5", "--json", "--cache", "h2o", "--budget", "0.5"
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)["stats"]
    assert stats["cache"] == "h2o" and stats["budget_slots"] == (stats["prompt_tokens"] - 1) // 2
    assert stats["peak_cache_slots"] == stats["budget_slots"]
