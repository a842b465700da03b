"""`python -m anjax.aot`, the command's established name: a shim for `anjax.cli.aot`."""

from anjax import cli
from anjax.cli.aot import main

if __name__ == "__main__":
    cli.run(main)
