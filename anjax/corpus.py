"""`python -m anjax.corpus`, the command's established name: a shim for `anjax.cli.corpus`."""

import sys

from anjax.cli.corpus import main

if __name__ == "__main__":
    sys.exit(main())
