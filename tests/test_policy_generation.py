"""Generation under the training-free cache policies (`Engine` with `EngineConfig(cache=policy, budget=...)`).

Oracles (`policy_oracle`, brute-force forwards with explicit per-(layer, KV head) masks): `window` and
`h2o` are the streamed forward with the prompt's fed tokens as the first chunk and then one token per
chunk (eviction back to the budget after every decoded token); `snapkv` is the scoring oracle (the prompt
compressed once, every decoded token kept). Each greedy id must be the oracle's argmax at its step.
"""

import jax
import pytest
from conftest import slow_case
from policy_oracle import brute_force, streamed_logp

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.inference.engine import CacheOverflowError, Engine, EngineConfig
from anjax.inference.policies import Policy, fraction_slots

PROMPTS = [
    "The cat sat on the mat. Did the dog see it? Yes! The dog saw the cat, and the cat saw the dog",
    "Mr. Smith went to Washington. He arrived at 3",
    "Numbers like 12, 345 and 6789 appear too, and then",
]
SETTINGS = dict(policy_sink=2, policy_obs=3, policy_kernel=3)
NEW = 10


@pytest.fixture(scope="module")
def tiny_params():
    """A tiny model with its weights scaled 4×: at init the greedy ids repeat one token whatever the cache
    holds; scaled, they follow the context, so an eviction changes them."""
    cfg = tiny_config(vocab_size=400)
    return cfg, jax.tree.map(lambda x: 4 * x, init_params(cfg, jax.random.key(5)))


def _engine(tiny_params, tokenizer, **config):
    return Engine(*tiny_params, tokenizer, EngineConfig(chunk_size=4, batch_size=2, **config))


def _generated(outs):
    return [o.ids[len(o.prompt_ids) :] for o in outs]


@pytest.mark.parametrize("kind", ["h2o", slow_case("window"), "snapkv"])
def test_generation_equals_brute_force(tiny_params, tiny_tokenizer, kind):
    """Rows of different lengths and budgets (half of each prompt) in batches with a dummy row: every greedy id
    is the oracle's argmax; window and h2o hold their budget to the end, snapkv its budget + the fed tokens;
    and the eviction matters (the full cache generates something else)."""
    cfg, params = tiny_params
    outs = _engine(tiny_params, tiny_tokenizer, cache=kind, budget=0.5, **SETTINGS).generate(PROMPTS, NEW, stop_ids=())
    policy = Policy(kind, sink=2, obs=3, kernel=3)
    for out, gen in zip(outs, _generated(outs)):
        n, b = len(out.prompt_ids) - 1, fraction_slots(0.5, len(out.prompt_ids) - 1)
        row = out.prompt_ids + gen
        if kind == "snapkv":
            logp = brute_force(cfg, params, row, n, policy, b)[0]
        else:
            logp = streamed_logp(cfg, params, row[:-1], policy, b, 1, first=n)
        assert len(gen) == NEW
        for j, token in enumerate(gen):
            assert logp[n + j, token] >= logp[n + j].max() - 1e-4, (j, token, int(logp[n + j].argmax()))
        held = b + NEW if kind == "snapkv" else b
        assert out.stats["budget_slots"] == b and out.stats["peak_cache_slots"] == held
    full = _generated(_engine(tiny_params, tiny_tokenizer, cache="full").generate(PROMPTS, NEW, stop_ids=()))
    assert full != _generated(outs)


@pytest.mark.parametrize("kind", [slow_case("window"), slow_case("snapkv"), "h2o"])
def test_budget_covering_the_request_equals_full(tiny_params, tiny_tokenizer, kind):
    """A budget (in slots) above prompt + new tokens evicts nothing: the full cache's ids."""
    full = _engine(tiny_params, tiny_tokenizer, cache="full").generate(PROMPTS, NEW, stop_ids=())
    outs = _engine(tiny_params, tiny_tokenizer, cache=kind, budget=1000).generate(PROMPTS, NEW, stop_ids=())
    assert _generated(outs) == _generated(full)


@pytest.mark.parametrize(
    "config, fragment",
    [
        (dict(cache="h2o"), "needs a budget"),
        (dict(cache="h2o", budget=0), "needs a budget"),
        (dict(cache="h2o", budget=1.5), "needs a budget"),
        (dict(cache="h2o", budget=True), "needs a budget"),
        (dict(cache="full", budget=0.5), "apply to the cache policies"),
        (dict(cache="anchor", policy_sink=2), "apply to the cache policies"),
        (dict(cache="snapkv", budget=8, policy_kernel=2), "odd kernel"),
        (dict(cache="window", budget=8, sink_tokens=2), "no sink_tokens"),
        (dict(cache="window", budget=8, positions="reference"), "true positions only"),
        (dict(cache="lru", budget=8), "cache must be one of"),
    ],
)
def test_bad_policy_config(config, fragment):
    with pytest.raises(ValueError, match=fragment):
        EngineConfig(**config)


def test_protected_spans_are_refused_with_a_policy(tiny_params, tiny_tokenizer):
    engine = _engine(tiny_params, tiny_tokenizer, cache="h2o", budget=4)
    with pytest.raises(ValueError, match="no protected spans"):
        engine.generate([PROMPTS[1]], 2, protect=[["Smith"]])


def test_a_prompt_over_the_capacity_is_refused_by_name(tiny_params, tiny_tokenizer):
    """The prefill holds the whole prompt (then the budget): a capacity below the prompt stops the row, named."""
    engine = _engine(tiny_params, tiny_tokenizer, cache="h2o", budget=4, capacity=8)
    with pytest.raises(CacheOverflowError, match="h2o cache's prefill holds the whole prompt"):
        engine.generate([PROMPTS[0]], 2)
    assert engine.generate([PROMPTS[0]], 2, raise_errors=False)[0].error.endswith("raise --capacity")
