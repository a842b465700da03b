"""`python -m anjax.serve`: a shim for `anjax.cli.serve`."""

from anjax import cli
from anjax.cli.serve import main

if __name__ == "__main__":
    cli.run(main)
