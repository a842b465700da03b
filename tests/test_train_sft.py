"""SFT: on Alpaca data the training loss is exactly the cross-entropy of the response tokens;
the prompt's tokens contribute nothing."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from anjax.core.config import tiny_config
from anjax.core.mask import token_metadata
from anjax.core.model import Llama, init_params
from anjax.text.anchors import add_ac_token, make_scheme
from anjax.text.encode import Encoder, alpaca_prompt
from anjax.train.data import DataConfig
from anjax.train.prepare import make_batches
from anjax.train.trainer import loss_sums

EXAMPLES = [
    {
        "instruction": "Translate to French.",
        "input": "Good morning. How are you?",
        "output": "Bonjour. Comment allez-vous ?",
    },
    {"instruction": "Name a prime number.", "input": "", "output": "Seven is prime. So is eleven."},
    {"instruction": "Say hi.", "input": "", "output": "Hi!"},
]


def test_prompt_tokens_are_out_of_the_loss(tmp_path, tiny_tokenizer):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(EXAMPLES))
    tokenizer = tiny_tokenizer
    add_ac_token(tokenizer)
    data = DataConfig(path=str(path), format="alpaca", seq_len=512, batch_size=3, shuffle=False, eval_split=None)
    scheme = make_scheme(tokenizer, "ac", add_bos=data.add_bos)
    anchor_ids = scheme.ids
    batch = next(make_batches(data, tokenizer, scheme))

    cfg = tiny_config(vocab_size=len(tokenizer), anchor_mode="ac", anchor_tokens=("<AC>",), anchor_ids=anchor_ids)
    params = init_params(cfg, jax.random.PRNGKey(0))
    loss_sum, count = jax.jit(loss_sums, static_argnums=(0, 3))(cfg, params, jax.tree.map(jnp.asarray, batch), False)

    @jax.jit  # one compile, not op by op
    def log_probs(params, tokens, valid, doc):
        meta = token_metadata(tokens, valid, doc, anchor_ids=anchor_ids)
        logits, _ = Llama(cfg).apply({"params": params}, tokens, meta, None, full_attention=False)
        return jax.nn.log_softmax(logits, -1)

    logp = np.asarray(log_probs(params, batch["tokens"], batch["valid"], batch["doc"]))
    expected_sum, expected_count = 0.0, 0
    for row, ex in enumerate(EXAMPLES):
        prompt = Encoder(tokenizer, scheme).prompt(alpaca_prompt(ex["instruction"], ex["input"]))[0]
        n = int(batch["valid"][row].sum())
        assert list(batch["tokens"][row, : len(prompt)]) == prompt and n < data.seq_len  # whole example, untruncated
        assert not batch["loss_mask"][row, : len(prompt) - 1].any()  # no target inside the prompt
        for t in range(len(prompt) - 1, n - 1):  # each response token (and EOS) predicted from its prefix
            expected_sum -= logp[row, t, batch["tokens"][row, t + 1]]
            expected_count += 1
    assert int(count) == expected_count == int(batch["loss_mask"].sum())
    np.testing.assert_allclose(float(loss_sum), expected_sum, rtol=1e-5)
