"""`python -m anjax.export --model PATH --out DIR`: write a Hugging Face Llama directory.

The directory loads with transformers' AutoModelForCausalLM / AutoTokenizer and
carries the anchor settings in config.json ("anjax" key), so anjax reloads it as an AnLLM.
"""
from __future__ import annotations

import argparse

from anjax import cli
from anjax.hf import save_hf_dir
from anjax.loading import load_model


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m anjax.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory, GGUF file or anjax run directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    args = parser.parse_args()
    cfg, params, tokenizer = load_model(args.model)
    out = save_hf_dir(cfg, params, tokenizer, args.out)
    print(f"exported {cfg.num_layers}-layer model (anchor_mode={cfg.anchor_mode}) to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
