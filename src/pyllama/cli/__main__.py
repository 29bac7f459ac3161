"""``python -m pyllama.cli ...`` is the ``pyllama`` command too (as when cli was one module)."""

import sys

from pyllama.cli import main

if __name__ == "__main__":
    sys.exit(main())
