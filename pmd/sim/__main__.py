"""``python -m pmd.sim --socket PATH [...]``: the built-in virtio-net device in its own process."""

from __future__ import annotations

import sys

from .process import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
