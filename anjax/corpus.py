"""`python -m anjax.corpus`, the command's established name: a shim for `anjax.cli.corpus`."""

from anjax import cli
from anjax.cli.corpus import main

if __name__ == "__main__":
    cli.run(main)
