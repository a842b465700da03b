"""`python -m anjax.anchors`, the command's established name: a shim for `anjax.text.anchors`."""

import sys

from anjax.text.anchors import main

if __name__ == "__main__":
    sys.exit(main())
