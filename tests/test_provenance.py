"""Every report's provenance record: code, command, libraries, machine, model weights and training step."""

import json
from pathlib import Path

import jax

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.core.params import with_scan_layers
from anjax.eval import provenance
from anjax.inference.scoring import scoring_model

REPO = Path(__file__).resolve().parent.parent


def test_record_names_code_command_machine_and_model(tiny_tokenizer, tmp_path):
    cfg = tiny_config(vocab_size=len(tiny_tokenizer))
    params = init_params(cfg, jax.random.key(0))
    model = scoring_model(cfg, params, tiny_tokenizer, anchor_mode="ep")  # layers stacked
    run = tmp_path / "run"
    for step in ("100", "250", "tmp"):
        (run / "checkpoints" / step).mkdir(parents=True)
    (run / "model_config.json").write_text("{}")
    prov = provenance.begin("python -m anjax.evaluate", ["--model", str(REPO / "runs" / "x" / "hf"), "--limit", "5"])
    rec = json.loads(json.dumps(prov.finish(paths={"model": run / "export"}, model=model)))
    assert rec["command"] == "python -m anjax.evaluate --model runs/x/hf --limit 5"
    assert len(rec["commit"]) == 40 and isinstance(rec["dirty"], bool)
    assert rec["libraries"]["jax"] == jax.__version__
    machine = rec["machine"]
    assert machine["cpu"] and machine["cores"] >= 1 and len(machine["load_average_start"]) == 3
    m = rec["models"]["model"]
    assert m["training_step"] == 250 and m["path"] == str(run / "export")
    assert m["anchor_scheme"]["mode"] == "ep"
    # the fingerprint is the weights', whatever the layout; other weights, another fingerprint
    assert m["weights_sha256"] == provenance.weights_fingerprint(cfg, params)
    assert m["weights_sha256"] == provenance.weights_fingerprint(*with_scan_layers(cfg, params, True))
    assert m["weights_sha256"] != provenance.weights_fingerprint(cfg, init_params(cfg, jax.random.key(1)))
    assert provenance.relative(REPO / "configs" / "tiny.yaml") == "configs/tiny.yaml"
    assert provenance.training_step(tmp_path) is None
