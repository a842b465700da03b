"""`python -m anjax.prepare`, the command's name: a shim for `anjax.cli.prepare`."""

from anjax import cli
from anjax.cli.prepare import main

if __name__ == "__main__":
    cli.run(main)
