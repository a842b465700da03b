"""Anchor ids (EP punctuation, AC special token) and the segmentation CLI."""

import json

import pytest

from anjax.cli import anchors as anchors_cli
from anjax.core.config import AC_TOKEN, ANCHOR_SCHEME_FIELDS, tiny_config
from anjax.io import hf, run_dir
from anjax.text import anchors
from anjax.train import run_config


def test_ep_default_and_custom_tokens(tiny_tokenizer):
    tokens, ids = anchors.resolve_anchor_ids(tiny_tokenizer, "ep")
    assert tokens == (".", "?", "!")
    assert [tiny_tokenizer.decode([i]) for i in ids] == [".", "?", "!"]
    tokens, ids = anchors.resolve_anchor_ids(tiny_tokenizer, "ep", [".", ","])
    assert tokens == (".", ",") and len(set(ids)) == 2
    assert anchors.resolve_anchor_ids(tiny_tokenizer, "none") == ((), ())


def test_ep_anchor_that_is_not_one_token(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"'Hello world' is not one token in running text: .* pieces \["):
        anchors.resolve_anchor_ids(tiny_tokenizer, "ep", [".", "Hello world"])


def test_bad_mode(tiny_tokenizer):
    with pytest.raises(ValueError, match="anchor mode must be one of"):
        anchors.resolve_anchor_ids(tiny_tokenizer, "punct")


def test_ac_needs_the_token_then_add_is_idempotent(tiny_tokenizer):
    with pytest.raises(ValueError, match="no <AC> token; add it with anjax.text.anchors.add_ac_token"):
        anchors.resolve_anchor_ids(tiny_tokenizer, "ac")
    n = len(tiny_tokenizer)
    ac_id = anchors.add_ac_token(tiny_tokenizer)
    assert anchors.add_ac_token(tiny_tokenizer) == ac_id and len(tiny_tokenizer) == n + 1
    assert anchors.resolve_anchor_ids(tiny_tokenizer, "ac") == ((AC_TOKEN,), (ac_id,))
    ids = tiny_tokenizer.encode(f"Hi.{AC_TOKEN} Yes", add_special_tokens=False)
    assert ids.count(ac_id) == 1  # never split
    assert AC_TOKEN not in tiny_tokenizer.decode(ids, skip_special_tokens=True)  # special


@pytest.fixture
def cli(tiny_tokenizer, monkeypatch, capsys):
    """Run the CLI with its `load_tokenizer` returning the tiny tokenizer."""
    monkeypatch.setattr(anchors_cli, "load_tokenizer", lambda path: tiny_tokenizer)

    def run(*argv):
        rc = anchors_cli.main(list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_cli_json_ac(cli):
    rc, out, _ = cli("--mode", "ac", "--text", "The cat sat. Did it? Yes", "--bos", "--json")
    assert rc == 0
    d = json.loads(out)
    assert len(d["ids"]) == len(d["tokens"]) == len(d["seg"]) == len(d["anchor"])
    assert d["tokens"][0] == "<s>" and d["tokens"].count(AC_TOKEN) == 3 and d["tokens"][-1] == AC_TOKEN
    assert d["anchor"] == [t == AC_TOKEN for t in d["tokens"]]
    first_ac = d["tokens"].index(AC_TOKEN)
    assert d["seg"][first_ac] == 0 and d["seg"][first_ac + 1] == 1 and d["seg"][-1] == 2


def test_cli_table_ep(cli):
    rc, out, _ = cli("--mode", "ep", "--text", "One. Two!")
    assert rc == 0 and "2 anchors, 2 sentences" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "ep", "--anchors", "Hello world", "--text", "x."], "is not one token in running text"),
        (["--mode", "punct", "--text", "x."], "--mode must be one of"),
        (["--mode", "ac", "--text", "  "], "--text is empty"),
    ],
)
def test_cli_errors_one_line_exit_2(cli, argv, message):
    rc, out, err = cli(*argv)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_window_and_rule_are_stored_with_the_model_and_old_models_load_as_the_paper(tiny_tokenizer, tmp_path):
    """The scheme's window and anchor rule ride in the model config, the HF export's "anjax" block and the run
    directory; an export or run written before they existed loads as window 0, rule "ansan" (the paper)."""
    notes = []
    scheme, cfg, _ = anchors.resolve_scheme(
        tiny_config(vocab_size=len(tiny_tokenizer)),
        tiny_tokenizer,
        mode="ep",
        window=16,
        rule="sepllm",
        note=notes.append,
    )
    assert (scheme.window, scheme.rule, cfg.anchor_window, cfg.anchor_rule) == (16, "sepllm", 16, "sepllm")
    assert notes == [
        "anchor window=16 overrides the model's anchor window=0",
        "anchor rule=sepllm overrides the model's anchor rule=ansan",
    ]
    block = hf.hf_config_from(cfg)["anjax"]
    assert hf.config_from_hf(hf.hf_config_from(cfg)) == cfg
    old = {k: v for k, v in block.items() if k not in ("anchor_window", "anchor_rule")}
    assert set(block) == set(ANCHOR_SCHEME_FIELDS)
    reloaded = hf.config_from_hf({**hf.hf_config_from(cfg), "anjax": old})
    assert (reloaded.anchor_window, reloaded.anchor_rule) == (0, "ansan")
    assert anchors.resolve_scheme(reloaded, tiny_tokenizer)[0].window == 0
    # a run directory from before: its config.yaml lacks anchors.window / rule -> resumable by the defaults only
    rc = run_config.RunConfig().to_dict()
    stored = json.loads(json.dumps(rc))
    del stored["anchors"]["window"], stored["anchors"]["rule"]
    (tmp_path / "config.yaml").write_text(json.dumps(stored))
    run_dir.check_resumable(tmp_path, rc)
    with pytest.raises(run_dir.CheckpointError, match="anchors.window"):
        run_dir.check_resumable(tmp_path, run_config.load(None, ["anchors.window=16"]).to_dict())
    with pytest.raises(ValueError, match="anchors.rule"):
        run_config.load(None, ["anchors.rule=window"])
