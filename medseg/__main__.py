"""``python -m medseg``: the same CLI as the ``medseg`` command."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
