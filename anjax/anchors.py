"""`python -m anjax.anchors`, the command's established name: a shim for `anjax.cli.anchors`."""

import sys

from anjax.cli.anchors import main

if __name__ == "__main__":
    sys.exit(main())
