"""Shared fixtures: a tiny real tokenizer (byte-level BPE like SmolLM2/GPT-2, trained in ~0.1 s); a tiny model
(`tiny_params`, `tiny`, `tiny_model_dir`); `slow_case`; `load_script`; the suite's compiler setting."""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import jax
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from anjax.core.config import tiny_config
from anjax.core.model import init_params
from anjax.io import hf

TINY_TRAINING_TEXT = """\
The cat sat on the mat. Did the dog see it? Yes! The dog saw the cat, and the cat ran.
A sentence ends with a period. Questions end with a question mark? Some end with an exclamation mark!
Commas, semicolons; and colons: appear inside sentences. Numbers like 12, 345 and 6789 appear too.
Mr. Smith went to Washington. He arrived at 3 p.m. and left at 5 p.m. on the same day.
"""


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TRAINING_TEXT] * 4, trainer)
    return tok.to_str()


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh byte-level BPE tokenizer (vocab ~400; pad 0, bos <s> 1, eos </s> 2; no <AC>).

    ".", "?", "!", "," are single tokens.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """`make_tiny_tokenizer()`, function-scoped: tests may add tokens."""
    return make_tiny_tokenizer()


# `tiny` and `tiny_model_dir` of the evaluation tests; a module defining its own `tiny_params` overrides it
@pytest.fixture(scope="module")
def tiny_params():
    cfg = tiny_config(vocab_size=400)  # the tiny tokenizer's vocabulary
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture
def tiny(tiny_params, tiny_tokenizer):
    """(cfg, params, a fresh tokenizer): params are shared by the module (initialization is slow)."""
    assert len(tiny_tokenizer) == tiny_params[0].vocab_size
    return (*tiny_params, tiny_tokenizer)


@pytest.fixture
def tiny_model_dir(tiny, tmp_path):
    """The tiny model and tokenizer as an HF directory (no anchor settings)."""
    cfg, params, tok = tiny
    return hf.save_hf_dir(cfg, params, tok, tmp_path / "tiny")


def load_script(path: str):
    """The repository's script at `path` (from the repository root, e.g. "benchmarks/bench_decode.py") as a module."""
    file = Path(__file__).resolve().parents[1] / path
    spec = importlib.util.spec_from_file_location(f"_script_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def slow_case(*values):
    """A parametrization only the full suite runs (`slow`): the fast tier keeps one case of each family."""
    return pytest.param(*values, marks=pytest.mark.slow)


def pytest_configure(config):
    """Tests compile with XLA's optimizations mostly off, subprocesses included (the environment variable): their
    tiny programs spend more time compiling than running (a third less CPU time, measured on the 8-device mesh
    test). What they prove is semantics; optimized compiles are proven by the AOT tests (real targets) and the
    README's main job (`test_main_job`), which compiles as users do."""
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    jax.config.update("jax_disable_most_optimizations", True)


def pytest_collection_modifyitems(items):
    """The modules of heavy tests first, then slow tests, then the rest (a stable sort: a module's tests stay in
    order, together, so its module-scoped fixtures are built once). Under `-n` with `--dist worksteal`
    (pyproject's addopts) a worker that runs out takes the end of the other's queue: the run ends on short
    tests, not on one minute-long test while the other core idles."""
    heavy = {item.path for item in items if item.get_closest_marker("heavy")}
    items.sort(key=lambda item: (item.path not in heavy, item.get_closest_marker("slow") is None))
