"""`python -m anjax.export --model PATH --out DIR [--force]`: write a Hugging Face Llama directory.

The directory loads with transformers' AutoModelForCausalLM / AutoTokenizer and
carries the anchor settings in config.json ("anjax" key), so anjax reloads it as an AnLLM.
An existing DIR is replaced only when anjax wrote it (its `.anjax-export` lists every
file in it); `--force` moves any other directory aside instead of refusing.
"""

from __future__ import annotations

import sys

from anjax import cli
from anjax.io import outputs


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python -m anjax.export", description=cli.summary(__doc__))
    parser.add_argument(
        "--model", default=None, help="HF directory, GGUF file or anjax run directory (default: embedded SmolLM2-135M)"
    )
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="if DIR exists and anjax did not write it, move it aside to DIR.replaced-<time>",
    )
    args = parser.parse_args(argv)
    out = outputs.check_replaceable(args.out, args.force, "--out")
    cli.check_creatable(out, "--out")
    if args.model is not None:
        outputs.check_output(out, "--out", [("--model", args.model)])
    from anjax.io.hf import save_hf_dir
    from anjax.io.loading import load_model

    cfg, params, tokenizer = load_model(args.model)
    if out.exists() and not outputs.written_by_anjax(out):
        print(f"note: {out} was not written by anjax; it is moved to {out.name}.replaced-<time>", file=sys.stderr)
    with outputs.naming_full_disk(out):
        out = save_hf_dir(cfg, params, tokenizer, out, force=args.force)
    print(f"exported {cfg.num_layers}-layer model (anchor_mode={cfg.anchor_mode}) to {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
