"""The engine, the scorer and the server's scheduler over a (data, tensor) mesh of 8 simulated CPU devices give
one device's results: greedy ids (anchor and full cache, ragged rows, sentences closed during decode), cache
peaks, log-likelihoods (fp32, 1e-5) on every mesh, and served completions on the mesh with both axes split
(SERVED; the scheduler runs the engine's steps on its own shapes, compiled again per mesh); weights and the
KV cache are really split."""

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest

from anjax import cli
from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.inference import placement
from anjax.inference.engine import Engine, EngineConfig
from anjax.inference.scoring import Scorer, ScoreRequest, scoring_model
from anjax.serve.metrics import Metrics
from anjax.serve.scheduler import Finish, Request, Scheduler

ROOT = Path(__file__).resolve().parents[1]
EP_IDS = (5, 7)
# 2 layers, width 64; 8 query and 4 KV heads: tensor 4 and 2 divide both
EP = dict(anchor_mode="ep", anchor_ids=EP_IDS, anchor_tokens=(".", "!"))
CFG = tiny_config(num_heads=8, num_kv_heads=4, head_dim=8, **EP)
MESHES = {"data8": (8, 1), "tensor4_data2": (2, 4), "tensor2_data4": (4, 2)}
SERVED = "tensor2_data4"
NEW_TOKENS = 10


def prompts() -> list[list[int]]:
    """Five ragged rows with anchors (first, consecutive, long anchor-free runs)."""
    rng = np.random.default_rng(4)
    rows = []
    for n in (13, 2, 21, 7, 4):
        ids = rng.integers(8, 250, n)
        ids[rng.random(n) < 0.2] = EP_IDS[0]
        ids[rng.random(n) < 0.05] = EP_IDS[1]
        rows.append(ids.tolist())
    return rows


def batch(rows: int) -> int:
    """The batch `Engine.generate` pads the prompts to over `rows` data shards."""
    return -(-len(prompts()) // rows) * rows


def requests() -> list[ScoreRequest]:
    rng = np.random.default_rng(5)
    out = []
    for n in (17, 5, 30):
        prefix = [int(t) for t in rng.integers(8, 250, n)]
        prefix[3::4] = [EP_IDS[0]] * len(prefix[3::4])
        choices = [rng.integers(8, 250, k).tolist() for k in (3, 1, 4)]
        out.append(ScoreRequest.from_ids([(prefix + [EP_IDS[1]], c) for c in choices]))
    return out


def serve(engine: Engine, rows: list[list[int]]) -> list[list[int]]:
    """Every row's greedy completion through the scheduler (8 slots, no HTTP)."""
    sched = Scheduler(engine, slots=8, capacity=64, metrics=Metrics())
    done = [threading.Event() for _ in rows]
    reqs = [
        Request(
            prompt_ids=r,
            protected=[False] * len(r),
            max_tokens=NEW_TOKENS,
            emit=lambda e, d=d: isinstance(e, Finish) and d.set(),
        )
        for r, d in zip(rows, done)
    ]
    sched.start()
    try:
        for r in reqs:
            sched.submit(r)
        assert all(d.wait(300) for d in done), sched.failed
    finally:
        sched.stop()
    return [r.ids for r in reqs]


def run(mesh, served: bool) -> dict:
    """Everything one mesh (None: one device) computes; the scheduler's completions when `served`."""
    params = init_params(CFG, jax.random.key(2))
    out = {}
    for cache in ("anchor", "full"):
        eng = Engine(CFG, params, config=EngineConfig(cache=cache, chunk_size=4), mesh=mesh)
        gens = eng.generate(prompts(), max_new_tokens=NEW_TOKENS, stop_ids=())
        out[cache] = [g.ids for g in gens]
        out[f"{cache}_peak"] = [g.stats["peak_cache_slots"] for g in gens]
        if cache == "anchor":
            out["served"] = serve(eng, prompts()) if served else None
            pre = eng.prefill(prompts(), batch(placement.rows(mesh)), 4, 128)  # generate's shapes: compiled
            keys = pre.state.cache.keys
            keys = keys[0] if isinstance(keys, tuple) else keys
            out["cache_shard"] = list(keys.addressable_shards[0].data.shape)
            attn = eng.params["layers" if "layers" in eng.params else "layer_0"]["attn"]
            out["q_shard"] = list(attn["q" if "q" in attn else "qkv"].addressable_shards[0].data.shape)
    model = scoring_model(CFG, params, None, mesh=mesh)
    scorer = Scorer(model, batch_size=2, chunk_size=8)
    for cache, recompute in (("anchor", False), ("full", False)):
        out[f"ll_{cache}_{recompute}"] = scorer.run(requests(), cache, recompute).loglik
    return out


def main() -> None:
    results = {"devices": jax.device_count(), "one": run(None, served=True)}
    for name, (data, tensor) in MESHES.items():
        results[name] = run(placement.inference_mesh(CFG, data, tensor), served=name == SERVED)
    try:
        placement.inference_mesh(CFG.replace(num_kv_heads=2), 1, 4)
    except ValueError as e:
        results["refused"] = str(e)
    print(json.dumps(results))


@functools.cache
def eight_devices() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    return result


@pytest.mark.slow  # 8 simulated devices in a subprocess, three meshes
@pytest.mark.heavy
@pytest.mark.parametrize("mesh", list(MESHES))
def test_a_mesh_gives_one_devices_ids_loglik_and_completions(mesh):
    res, one = eight_devices()[mesh], eight_devices()["one"]
    data, tensor = MESHES[mesh]
    for cache in ("anchor", "full"):
        assert res[cache] == one[cache], cache
        assert res[f"{cache}_peak"] == one[f"{cache}_peak"], cache
    decoded_anchors = sum(t in EP_IDS for ids, p in zip(one["anchor"], prompts()) for t in ids[len(p) : -1])
    assert decoded_anchors > 0  # sentences closed during decode
    assert res["served"] == (one["served"] if mesh == SERVED else None)
    for served, ids, p in zip(one["served"], one["anchor"], prompts()):  # the server stops at EOS
        assert served == ids[len(p) : len(p) + len(served)] and len(served) > 0
    for key in [k for k in one if k.startswith("ll_")]:
        np.testing.assert_allclose(np.concatenate(res[key]), np.concatenate(one[key]), rtol=0, atol=1e-5)
    # rows over data, KV heads over tensor; q heads over tensor (data 8 decodes with fused, replicated q/k/v)
    assert res["cache_shard"][-4:-2] == [batch(data) // data, CFG.num_kv_heads // tensor]
    if tensor > 1:
        assert res["q_shard"][-2] == CFG.num_heads // tensor


def test_a_tensor_size_that_does_not_divide_the_heads_is_refused():
    with pytest.raises(ValueError, match=r"tensor=4 must divide the model's 4 heads and 2 KV heads"):
        placement.inference_mesh(tiny_config(), 1, 4)
    with pytest.raises(ValueError, match="needs 16 devices"):
        placement.inference_mesh(tiny_config(num_heads=8, num_kv_heads=8, head_dim=8), 16, 1)
    assert placement.inference_mesh(tiny_config(), 1, 1) is None  # one device: no mesh
    assert cli.parse_mesh("tensor=4,data=2") == {"data": 2, "tensor": 4} and cli.parse_mesh("data=8")["tensor"] == 1
    for bad in ("data=0", "fsdp=2", "data=2;tensor=4", "tensor"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected data=D,tensor=T"):
            cli.parse_mesh(bad)


if __name__ == "__main__":
    main()
