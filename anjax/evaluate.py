"""`python -m anjax.evaluate`, the command's established name: a shim for `anjax.cli.evaluate`."""

from anjax import cli
from anjax.cli.evaluate import main

if __name__ == "__main__":
    cli.run(main)
