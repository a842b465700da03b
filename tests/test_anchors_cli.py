"""The segmentation command (`python -m anjax.anchors`): ids, tokens, sentences and anchors of a text, as JSON or
a table; bad arguments are one line and exit 2."""

import json

import pytest

from anjax.cli import anchors as anchors_cli
from anjax.core.config import AC_TOKEN


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
