"""The first check on a borrowed accelerator, in at most `--budget` seconds (default 480), with a JSON result.

    python benchmarks/device_check.py [--budget 480] [--out device_results] [--dry-run [--kernel gpu|tpu]]

Stage 1, correctness (at most `--stage1` s, default 180), each an assertion:
  kernel_fp32 / kernel_bf16: the platform's Pallas kernel (`anjax.core.flash_kernels`) at 4k tokens of a
      packed EP row, SmolLM2 heads (9 query, 3 key/value, head_dim 64): band output and LSE against the dense
      band, and the sparse path on the kernel (output, dQ, dK, dV) against dense attention under the predicate;
  engine_exact: tests/test_engine.py's fast exactness cases (anchor/full cache logits = one full forward) on
      the device, fp32 at the highest matmul precision;
  train_3_steps: three Adam steps of a 2-layer SmolLM2-shape model on 4k-token AC rows, attention=kernel
      against attention=dense: the same losses.
Stage 2, timings (best of 2 after a warm-up, bf16, 4-layer SmolLM2 shape): prefill (one chunk into an empty
cache) and train step (loss + gradients) dense vs kernel at 4k and 16k; decode of 64 tokens after a
4k-token prompt at batch 1 and 16, anchor vs full cache.
A check starts only while its stage's time is left; the JSON (`OUT/device_check.json`) is rewritten after
every check, so a hard stop (the shell's `timeout`) keeps what ran; it passes iff every stage-1 check passed
(stage 2 records timings, and errors such as dense attention out of memory at 16k, without failing).
`--dry-run` runs every check at tiny sizes on the CPU, the kernel in Pallas interpret mode (`--kernel`,
default gpu).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_attention import ANCHOR_ID, anchor_ids, packed_batch
from common import best_seconds

from anjax.core import flash_kernels as fk
from anjax.core import sparse_attention as sa
from anjax.core.config import ModelConfig, tiny_config
from anjax.core.mask import attention_allowed, token_metadata
from anjax.core.model import dot_attention, init_params
from anjax.inference import steps
from anjax.inference.sampling import MAX_STOP_IDS, Sampling
from anjax.inference.state import EngineSpec, init_state
from anjax.train.trainer import loss_sums

# max abs error: band output, band LSE, sparse-path output; gradients relative to the largest (bf16: fp32 math on
# the same bf16 inputs, P rounded to bf16 before P.V as the kernels do)
TOL = {"float32": dict(out=2e-5, lse=2e-5, grad=2e-4), "bfloat16": dict(out=2e-2, lse=1e-4, grad=2e-2)}


class Sizes(NamedTuple):
    check_len: int  # stage 1 kernel and training rows
    heads: tuple[int, int, int]  # (query heads, key/value heads, head_dim) of the kernel check
    model: ModelConfig  # stage 1 training and stage 2 timings (layers as given)
    lengths: tuple[int, ...]  # stage 2 prefill / train step
    prompt: int  # stage 2 decode
    new_tokens: int
    batches: tuple[int, ...]


def sizes(dry_run: bool) -> Sizes:
    ac = dict(anchor_mode="ac", anchor_tokens=("<AC>",), anchor_ids=(ANCHOR_ID,), vocab_size=ANCHOR_ID + 1)
    if dry_run:
        return Sizes(256, (2, 1, 16), tiny_config(**ac), (256,), 128, 4, (1, 2))
    return Sizes(4096, (9, 3, 64), ModelConfig(num_layers=4, **ac), (4096, 16384), 4096, 64, (1, 16))


def kernel_case(mode: str, T: int, heads: tuple[int, int, int], dtype, seed: int = 0, rows: int = 1, pad: int = 37):
    """(meta, q, k, v): packed rows of `mode` (ep | ac) with `pad` padding tokens, random q/k/v in `dtype`."""
    H, K, D = heads
    rng = np.random.default_rng(seed)
    batch = packed_batch(mode, T, rng, rows=rows, pad=pad)
    meta = token_metadata(batch["tokens"], batch["valid"], batch["doc"], anchor_ids=anchor_ids(mode))
    q = jnp.asarray(rng.standard_normal((rows, T, H, D)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((rows, T, K, D)), dtype) for _ in range(2))
    return meta, q, k, v


def band_allowed(meta):
    """[B, T, T] the predicate (anchor mode) restricted to the query's own sentence: the kernel's band."""
    return attention_allowed(meta, meta, False) & (meta.seg[:, None, :] == meta.seg[:, :, None])


def dense_band(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, meta):
    """(out [B, K, G, T, D], lse [B, K, G, T]) fp32 under `band_allowed`."""
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxTxKxD.shape[2]
    allowed = band_allowed(meta)
    f32 = lambda x: x.astype(jnp.float32)
    s = jnp.einsum("btkgd,bskd->bkgts", f32(q_BxTxHxD).reshape(B, T, K, H // K, D), f32(k_BxTxKxD))
    s = jnp.where(allowed[:, None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, -1)
    return jnp.einsum("bkgts,bskd->bkgtd", jnp.exp(s - lse[..., None]), f32(v_BxTxKxD)), lse


def kernel_errors(kernel: fk.Kernel, meta, q, k, v) -> dict[str, float]:
    """Max abs errors of the band kernel (out, lse; q taken as scaled) and of the sparse path on it (out) against
    dense fp32 math under the predicate at valid queries, and of its gradients (dq, dk, dv) relative to the
    largest dense gradient."""
    B, T, H, D = q.shape
    K = k.shape[2]
    f32 = lambda x: x.astype(jnp.float32)
    weight_D = jnp.cos(jnp.arange(D, dtype=jnp.float32))
    on_kernel = lambda q, k, v: sa.sparse_attention(q, k, v, meta, False, kernel=kernel)
    dense = lambda q, k, v: dot_attention(f32(q), f32(k), f32(v), attention_allowed(meta, meta, False))
    loss = lambda f, q, k, v: jnp.sum(jnp.where(meta.valid[..., None, None], f32(f(q, k, v)), 0.0) * weight_D)

    @jax.jit
    def run(q, k, v):
        q5 = q.reshape(B, T, K, H // K, D).transpose(0, 2, 3, 1, 4)
        band = fk.band_flash(kernel, q5, k, v, sa.band_starts(meta, False))
        grads = [jax.grad(loss, argnums=(1, 2, 3))(f, q, k, v) for f in (on_kernel, dense)]
        return band, dense_band(q, k, v, meta), on_kernel(q, k, v), dense(q, k, v), grads

    (out_b, lse_b), (want_out_b, want_lse_b), got, want, (g_got, g_want) = run(q, k, v)
    valid = np.asarray(meta.valid)
    at_valid = lambda x, want_x, mask: float(np.abs(np.asarray(f32(x) - want_x))[np.broadcast_to(mask, x.shape)].max())
    errors = {
        "band_out": at_valid(out_b, want_out_b, valid[:, None, None, :, None]),
        "band_lse": at_valid(lse_b, want_lse_b, valid[:, None, None, :]),
        "out": at_valid(got, want, valid[..., None, None]),
    }
    for name, g, w in zip(("dq", "dk", "dv"), g_got, g_want):
        errors[name] = float(jnp.abs(f32(g) - w).max() / jnp.abs(w).max())
    return errors


def failures(errors: dict[str, float], dtype: str) -> list[str]:
    """The errors above TOL[dtype]."""
    tol = TOL[dtype]
    limit = lambda name: tol["grad"] if name in ("dq", "dk", "dv") else tol["lse" if "lse" in name else "out"]
    return [f"{name} {err:.2e} > {limit(name):.0e}" for name, err in errors.items() if not err <= limit(name)]


def attention_for(kernel: fk.Kernel) -> str:
    return f"kernel:{kernel.name}{'-interpret' if kernel.interpret else ''}"


def train_losses(cfg: ModelConfig, batch, steps: int = 3) -> list[float]:
    """Mean token losses of `steps` Adam steps from the same initialisation."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    tx = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state):
        loss_sum, grads = jax.value_and_grad(lambda p: loss_sums(cfg, p, batch, False)[0])(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss_sum / batch["loss_mask"].sum()

    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    return losses


def ac_rows(L: int, rows: int = 1, seed: int = 0):
    return packed_batch("ac", L, np.random.default_rng(seed), rows=rows)


# ----------------------------------------------------------------------------- checks


def check_kernel(kernel, sz: Sizes, dtype: str) -> dict:
    meta, q, k, v = kernel_case("ep", sz.check_len, sz.heads, dtype, seed=1)
    errors = kernel_errors(kernel, meta, q, k, v)
    bad = failures(errors, dtype)
    assert not bad, "; ".join(bad)
    return {"errors": errors, "tolerances": TOL[dtype], "T": sz.check_len}


def check_engine(dry_run: bool) -> dict:
    import pytest

    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        select = "equals_full_forward_pass and ep-1-tiny" if dry_run else "equals_full_forward_pass or equals_causal"
        args = ["-q", "-x", "-p", "no:cacheprovider", "-m", "not slow", "-k", select, "tests/test_engine.py"]
        code = pytest.main(args)
    finally:
        jax.config.update("jax_default_matmul_precision", None)
    assert code == 0, f"pytest exit code {code}"
    return {"pytest": " ".join(args)}


def check_training(kernel, sz: Sizes) -> dict:
    cfg = sz.model.replace(num_layers=2, dtype="float32")
    batch = ac_rows(sz.check_len)
    dense, on_kernel = (train_losses(cfg.replace(attention=a), batch) for a in ("dense", attention_for(kernel)))
    diff = max(abs(a - b) for a, b in zip(dense, on_kernel))
    assert diff <= 1e-4 * max(dense), f"losses differ by {diff:.2e}: dense {dense}, kernel {on_kernel}"
    return {"dense": dense, "kernel": on_kernel, "max_diff": diff}


def time_prefill_and_train(kernel, sz: Sizes, L: int) -> dict:
    base = sz.model.replace(dtype="bfloat16")
    batch = ac_rows(L)
    spec = EngineSpec(anchor_cache=True, anchor_ids=base.anchor_ids, ac_id=ANCHOR_ID)
    row = {"seq_len": L}
    for attention in ("dense", attention_for(kernel)):
        cfg = base.replace(attention=attention)
        params = init_params(cfg, jax.random.PRNGKey(0))
        state = init_state(cfg, 1, L, jnp.zeros((1,), bool))
        prefill = jax.jit(lambda p, s, t, v, cfg=cfg: steps.prefill(cfg, spec, p, s, t, v).cache)
        step = jax.jit(jax.value_and_grad(lambda p, cfg=cfg: loss_sums(cfg, p, batch, False)[0]))
        name = "dense" if attention == "dense" else "kernel"
        for what, fn, args in (
            ("prefill", prefill, (params, state, batch["tokens"], batch["valid"])),
            ("train", step, (params,)),
        ):
            try:  # e.g. dense attention out of memory at 16k: recorded, the kernel still measured
                row[f"{what}_{name}_s"] = best_seconds(fn, *args, repeats=2)
            except Exception as e:
                row[f"{what}_{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def time_decode(sz: Sizes, batch: int) -> dict:
    cfg = sz.model.replace(dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompt = ac_rows(sz.prompt, rows=batch)
    slots = sz.prompt + sz.new_tokens
    row = {"batch": batch, "prompt": sz.prompt, "new_tokens": sz.new_tokens}
    zeros = lambda dtype: jnp.zeros((batch,), dtype)
    sampling = Sampling(
        temperature=zeros(jnp.float32),
        top_k=zeros(jnp.int32),
        top_p=jnp.ones((batch,), jnp.float32),
        seed=zeros(jnp.uint32),
        stop_ids=jnp.full((MAX_STOP_IDS,), -1, jnp.int32),
        max_sentence_tokens=jnp.zeros((), jnp.int32),
    )
    for cache in ("anchor", "full"):
        spec = EngineSpec(anchor_cache=cache == "anchor", anchor_ids=cfg.anchor_ids, ac_id=ANCHOR_ID)
        tokens, valid = prompt["tokens"][:, :-1], prompt["valid"][:, :-1]
        state = steps.prefill(cfg, spec, params, init_state(cfg, batch, slots, zeros(bool)), tokens, valid)
        state = steps.start_decode(state, spec, slots)
        loop = jax.jit(
            lambda p, s, t, spec=spec: (
                steps.decode_loop(cfg, spec, slots, sz.new_tokens, p, s, t, zeros(bool), sampling).tokens
            )
        )
        seconds = best_seconds(loop, params, state, prompt["tokens"][:, -1], repeats=2)
        row[f"{cache}_tok_s"] = batch * sz.new_tokens / seconds
        row[f"{cache}_cache_slots"] = int(state.cache.length.max())
    return row


# ----------------------------------------------------------------------------- driver


def run(args) -> dict:
    sz = sizes(args.dry_run)
    kernel = fk.Kernel(args.kernel, interpret=True) if args.dry_run else fk.kernel_for(jax.default_backend())
    if kernel is None:
        raise SystemExit(f"error: no Pallas kernel on {jax.default_backend()!r}: run on a GPU/TPU or with --dry-run")
    t0 = time.perf_counter()
    result = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "kernel": attention_for(kernel),
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "checks": [],
    }
    stage1 = [
        ("kernel_fp32", lambda: check_kernel(kernel, sz, "float32")),
        ("kernel_bf16", lambda: check_kernel(kernel, sz, "bfloat16")),
        ("engine_exact", lambda: check_engine(args.dry_run)),
        ("train_3_steps", lambda: check_training(kernel, sz)),
    ]
    stage2 = [(f"prefill_train_{L}", lambda L=L: time_prefill_and_train(kernel, sz, L)) for L in sz.lengths]
    stage2 += [(f"decode_b{b}", lambda b=b: time_decode(sz, b)) for b in sz.batches]
    stopped = False
    for stage, checks, limit in ((1, stage1, min(args.stage1, args.budget)), (2, stage2, args.budget)):
        for name, check in checks:
            entry = {"stage": stage, "name": name}
            start = time.perf_counter()
            if stopped or start - t0 >= limit:
                entry["status"] = "skipped: stopped" if stopped else "skipped: budget"
            else:
                try:
                    entry.update(check())
                    entry["status"] = "pass" if stage == 1 else "done"
                except KeyboardInterrupt:  # the shell's `timeout` (SIGINT): keep what ran
                    entry["status"], stopped = "stopped: time limit", True
                except Exception as e:  # reported, and the next check runs
                    entry["status"] = "fail" if isinstance(e, AssertionError) else "error"
                    entry["message"] = f"{type(e).__name__}: {e}"[:2000]
                    traceback.print_exc()
                entry["seconds"] = round(time.perf_counter() - start, 1)
            result["checks"].append(entry)
            result["elapsed_s"] = round(time.perf_counter() - t0, 1)
            print(f"[{stage}] {name}: {entry['status']} ({entry.get('seconds', 0)} s)", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "device_check.json").write_text(json.dumps(result, indent=1))
    result["passed"] = all(c["status"] == "pass" for c in result["checks"] if c["stage"] == 1)  # stage 2: timings
    (args.out / "device_check.json").write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything (checks start only before it)")
    p.add_argument("--stage1", type=float, default=180.0, help="seconds for the correctness stage")
    p.add_argument("--out", type=Path, default=Path("device_results"), help="directory for device_check.json")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU, the kernel in interpret mode")
    p.add_argument("--kernel", choices=fk.KERNELS, default="gpu", help="--dry-run: the kernel to interpret")
    args = p.parse_args()
    result = run(args)
    summary = ", ".join(f"{c['name']} {c['status']}" for c in result["checks"])
    print(f"device check ({result['device']}, {result['kernel']}): {summary}; {result['elapsed_s']} s")
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
