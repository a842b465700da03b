"""`python -m anjax.lm_eval_adapter`, the command's established name: a shim for `anjax.eval.lm_eval_adapter`."""

from anjax.eval.lm_eval_adapter import AnjaxLM, main  # noqa: F401 (importing registers lm-eval's "anjax" model)

if __name__ == "__main__":
    main()
