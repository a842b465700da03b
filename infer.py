"""`python infer.py`: batched generation with an anchor, a full or a policy's KV cache (`anjax.cli.infer`)."""

from anjax import cli
from anjax.cli.infer import main

if __name__ == "__main__":
    cli.run(main)
