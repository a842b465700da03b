"""`python -m anjax.export`, the command's established name: a shim for `anjax.cli.export`."""

from anjax import cli
from anjax.cli.export import main

if __name__ == "__main__":
    cli.run(main)
