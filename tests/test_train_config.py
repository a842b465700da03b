"""Run configs: every shipped YAML loads; unknown keys and wrong types are rejected with the key named."""

from pathlib import Path

import pytest

from anjax.train import run_config

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    rc = run_config.load(path)
    assert rc.train.steps >= 1 and rc.data.seq_len >= 2


def test_paper_recipe():
    rc = run_config.load(Path(__file__).parents[1] / "configs" / "llama2-7b-ac.yaml")
    t = rc.train
    assert (t.lr, t.warmup_steps, t.schedule, t.b1, t.b2, t.weight_decay) == (2e-5, 20, "constant", 0.9, 0.999, 0.0)
    assert (rc.data.seq_len, rc.data.batch_size, rc.data.packing, rc.model.dtype) == (4096, 512, True, "bfloat16")
    assert rc.anchors.mode == "ac"


def test_overrides_are_typed():
    rc = run_config.load(
        None,
        [
            "run.dir=/tmp/x",
            "train.steps=7",
            "checkpoint.every=3",
            "train.lr=2e-5",
            "model.path=null",
            "anchors.tokens=['.', '?']",
            "model.arch.num_layers=2",
        ],
    )
    assert (rc.run.dir, rc.train.steps, rc.checkpoint.every, rc.train.lr) == ("/tmp/x", 7, 3, 2e-5)
    assert rc.model.path is None and rc.anchors.tokens == (".", "?") and rc.model.arch == {"num_layers": 2}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "train.stepz"),
        ("trian.steps=3", "trian"),
        ("train.steps=three", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("checkpoint.async_save=maybe", "checkpoint.async_save"),
        ("model.arch.num_layerz=2", "model.arch.num_layerz"),
        ("model.arch.num_layers=two", "model.arch.num_layers"),
        ("model.remat=some", "model.remat"),
        ("model.attention=flash", "model.attention"),
        ("model.arch.attention=sparse", "model.arch.attention"),
        ("data.seq_len=x", "data.seq_len"),
        ("train.steps", "key.path=value"),
    ],
)
def test_bad_overrides_rejected(override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        run_config.load(None, [override])
