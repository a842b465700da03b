"""`python -m anjax.anchors`, the command's established name: a shim for `anjax.cli.anchors`."""

from anjax import cli
from anjax.cli.anchors import main

if __name__ == "__main__":
    cli.run(main)
