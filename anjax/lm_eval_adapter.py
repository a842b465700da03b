"""`python -m anjax.lm_eval_adapter`, the command's established name: a shim for `anjax.cli.lm_eval`.

Importing it registers lm-eval's "anjax" model (`anjax.eval.lm_eval_adapter.AnjaxLM`)."""

from anjax import cli
from anjax.cli.lm_eval import main
from anjax.eval.lm_eval_adapter import AnjaxLM  # noqa: F401 (importing registers lm-eval's "anjax" model)

if __name__ == "__main__":
    cli.run(main)
