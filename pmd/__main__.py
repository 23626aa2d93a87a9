"""``python -m pmd``: the ``pmd`` command (:mod:`pmd.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
