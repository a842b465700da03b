"""`python -m anjax.report quality|policies|compare|curve|ab`: a shim for `anjax.cli.report`."""

from anjax import cli
from anjax.cli.report import main

if __name__ == "__main__":
    cli.run(main)
