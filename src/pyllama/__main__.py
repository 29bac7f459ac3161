"""``python -m pyllama ...`` is the ``pyllama`` command."""

import sys

from pyllama.cli import main

if __name__ == "__main__":
    sys.exit(main())
