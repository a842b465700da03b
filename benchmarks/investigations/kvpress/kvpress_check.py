"""Cross-check anjax's `window` and `snapkv` cache policies against NVIDIA kvpress on the same weights and documents.

    bash benchmarks/investigations/kvpress/kvpress_check.sh --tasks boolq,hellaswag --limit 20 --budget 0.5

kvpress pins transformers < 5.3, so it runs in its own environment (`.venv-kvpress`, built by
kvpress_check.sh); the steps talk through files in --dir:
1. `anjax` (anjax's venv): exports the model to DIR/hf (`anjax.io.hf.save_hf_dir`), encodes the items,
   fixes each item's budget (floor(budget × prefilled tokens), `anjax.eval.evaluate.item_budgets`) and
   scores them with the full cache, `window` and `snapkv` -> DIR/items.json, DIR/anjax.json;
2. `kvpress` (.venv-kvpress): loads DIR/hf with transformers (float32, eager), prefills each item's
   context (the prefix minus its last token, as anjax does) under kvpress's StreamingLLMPress /
   SnapKVPress (or no press) with the compression ratio that keeps exactly the same number of slots,
   then scores every choice against a copy of the compressed cache at its true positions -> DIR/kvpress.json;
3. `compare` (anjax's venv): same-argmax share and log-likelihood differences per policy ->
   benchmarks/investigations/kvpress/NAME.json and NAME.md.
Items whose context is too short for kvpress (n <= obs, or a budget below the observation window,
where kvpress's top-k breaks ties inside the window arbitrarily) are left out and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

POLICIES = ("window", "snapkv")


def run_anjax(args) -> None:
    from anjax.eval import evaluate, tasks
    from anjax.inference.policies import Policy
    from anjax.inference.scoring import Scorer, load_scoring_model
    from anjax.io.hf import save_hf_dir
    from anjax.io.loading import load_model

    out = Path(args.dir)
    cfg, params, tokenizer = load_model(args.model)
    save_hf_dir(cfg, params, tokenizer, out / "hf", force=True)
    model = load_scoring_model(args.model, anchor_mode=None)
    items, skipped = [], 0
    for name in args.tasks.split(","):
        for it in tasks.build_requests(name, tasks.load_task(name, None, args.limit), 0, tasks.DEFAULT_SEED):
            req = model.encode_request(it.pairs())
            n = len(req.prefix) - 1
            budget = evaluate.item_budgets([req], args.budget, ())[0]
            if n <= args.obs or budget < args.obs or budget < args.sink or budget >= n:
                skipped += 1
                continue
            items.append({"task": name, "gold": it.gold, "budget": budget, "request": req})
    reqs = [x["request"] for x in items]
    budgets = [x["budget"] for x in items]
    paths = [
        ("full", False),
        (Policy("window", sink=args.sink), budgets),
        (Policy("snapkv", obs=args.obs, kernel=args.kernel), budgets),
    ]
    results = Scorer(model, batch_size=args.batch_size).run_paths(reqs, paths)
    meta = {k: getattr(args, k) for k in ("model", "tasks", "limit", "budget", "sink", "obs", "kernel")}
    (out / "items.json").write_text(
        json.dumps(
            {
                **meta,
                "skipped": skipped,
                "items": [
                    {
                        "task": x["task"],
                        "gold": x["gold"],
                        "budget": x["budget"],
                        "prefix": list(x["request"].prefix),
                        "tails": [list(t) for t in x["request"].tails],
                        "continuations": [list(c) for c in x["request"].continuations],
                    }
                    for x in items
                ],
            }
        )
    )
    (out / "anjax.json").write_text(json.dumps({p: r.loglik for p, r in zip(("full", *POLICIES), results)}))
    print(f"anjax: {len(items)} items scored ({skipped} too short for kvpress left out)")


def run_kvpress(args) -> None:
    import copy

    import torch
    import transformers
    from kvpress import SnapKVPress, StreamingLLMPress
    from transformers import AutoModelForCausalLM, DynamicCache

    transformers.utils.logging.disable_progress_bar()
    out = Path(args.dir)
    spec = json.loads((out / "items.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32, attn_implementation="eager")
    model.eval()
    presses = {
        "full": lambda ratio: None,
        "window": lambda ratio: StreamingLLMPress(compression_ratio=ratio, n_sink=spec["sink"]),
        "snapkv": lambda ratio: SnapKVPress(
            compression_ratio=ratio, window_size=spec["obs"], kernel_size=spec["kernel"]
        ),
    }
    scores = {p: [] for p in presses}
    for item in spec["items"]:
        context = item["prefix"][:-1]
        n, kept = len(context), item["budget"]
        ratio = 1 - (kept + 0.5) / n  # kvpress keeps max(1, int(n * (1 - ratio))) = kept slots per head
        for name, make in presses.items():
            press, cache = make(ratio), DynamicCache()
            with torch.no_grad():
                if press is None:
                    model(input_ids=torch.tensor([context]), past_key_values=cache)
                else:
                    with press(model):
                        model(input_ids=torch.tensor([context]), past_key_values=cache)
                    assert cache.get_seq_length() == kept, (cache.get_seq_length(), kept)
                lls = []
                for tail, cont in zip(item["tails"], item["continuations"]):
                    chunk = item["prefix"][-1:] + tail + cont[:-1]
                    logits = model(
                        input_ids=torch.tensor([chunk]),
                        past_key_values=copy.deepcopy(cache),
                        position_ids=torch.arange(n, n + len(chunk))[None],
                    ).logits[0]
                    logp = torch.log_softmax(logits.float(), -1)
                    start = len(chunk) - len(cont)
                    lls.append(sum(float(logp[start + j, t]) for j, t in enumerate(cont)))
            scores[name].append(lls)
    import kvpress

    scores["versions"] = {
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / "kvpress.json").write_text(json.dumps(scores))
    print(f"kvpress: {len(spec['items'])} items scored")


def compare(args) -> None:
    import numpy as np

    from anjax.io import outputs

    out = Path(args.dir)
    spec = json.loads((out / "items.json").read_text())
    ours, theirs = json.loads((out / "anjax.json").read_text()), json.loads((out / "kvpress.json").read_text())
    rows = {}
    for p in ("full", *POLICIES):
        a, k = ours[p], theirs[p]
        diffs = np.concatenate([np.subtract(x, y) for x, y in zip(a, k)])
        rows[p] = {
            "items": len(a),
            "same_argmax": float(np.mean([np.argmax(x) == np.argmax(y) for x, y in zip(a, k)])),
            "mean_abs_diff": float(np.abs(diffs).mean()),
            "max_abs_diff": float(np.abs(diffs).max()),
            "mean_diff": float(diffs.mean()),
            "acc_anjax": float(np.mean([np.argmax(x) == it["gold"] for x, it in zip(a, spec["items"])])),
            "acc_kvpress": float(np.mean([np.argmax(y) == it["gold"] for y, it in zip(k, spec["items"])])),
        }
    report = {**{k: v for k, v in spec.items() if k != "items"}, "versions": theirs["versions"], "results": rows}
    fraction = np.mean([it["budget"] / (len(it["prefix"]) - 1) for it in spec["items"]])
    lines = [
        f"# anjax vs kvpress {theirs['versions']['kvpress']}: choice log-likelihoods",
        "",
        f"Model {spec['model'] or 'the embedded SmolLM2-135M-Instruct'}; tasks {spec['tasks']}, "
        f"first {spec['limit']} docs each, 0-shot; {rows['full']['items']} items "
        f"({spec['skipped']} too short for kvpress left out); budget {spec['budget']} of each context "
        f"(mean kept share {fraction:.3f}); window: sink {spec['sink']}; snapkv: obs {spec['obs']}, "
        f"avg-pool kernel {spec['kernel']}. kvpress: transformers {theirs['versions']['transformers']}, "
        f"torch {theirs['versions']['torch']}, float32, eager attention.",
        "",
        "| policy | items | same argmax | mean abs Δ loglik | max abs Δ | mean Δ (anjax − kvpress) "
        "| acc anjax | acc kvpress |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, r in rows.items():
        lines.append(
            f"| {p} | {r['items']} | {100 * r['same_argmax']:.1f}% | {r['mean_abs_diff']:.2e} | "
            f"{r['max_abs_diff']:.2e} | {r['mean_diff']:+.2e} | {100 * r['acc_anjax']:.1f} | "
            f"{100 * r['acc_kvpress']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    outputs.write_text(Path(args.results) / f"{args.name}.md", text)
    outputs.write_text(Path(args.results) / f"{args.name}.json", json.dumps(report, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("anjax", "kvpress", "compare"))
    p.add_argument("--dir", default="runs/kvpress_check", help="work directory shared by the steps")
    p.add_argument("--model", default=None, help="anjax model argument (default: embedded SmolLM2)")
    p.add_argument("--tasks", default="boolq,hellaswag")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--budget", type=float, default=0.5, help="kept share of each context, in (0, 1)")
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--obs", type=int, default=8)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--results", default="benchmarks/investigations/kvpress")
    p.add_argument("--name", default="kvpress_check")
    args = p.parse_args(argv)
    if not 0 < args.budget < 1 or args.limit < 1:
        p.error("--budget must be in (0, 1) and --limit >= 1")
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    {"anjax": run_anjax, "kvpress": run_kvpress, "compare": compare}[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
