"""Packet headers of a burst as numpy columns (docs/analytics.md).

:class:`HeaderParser` keeps one array per column and refills it for every burst;
:func:`parse` is the one-call form. The work is in C (:mod:`pmd.parse._headers`):
no Python per packet. Neither side of pmd is imported: any 2-D uint8 array of
packets with their lengths will do, ``RxQueue.rx_burst``'s or ``pool.data`` by ids.
"""

from __future__ import annotations

from ._headers import COLUMNS, FRAGMENT, MALFORMED, SNAPPED, TRUNCATED, HeaderParser, parse

__all__ = ["COLUMNS", "FRAGMENT", "MALFORMED", "SNAPPED", "TRUNCATED", "HeaderParser", "parse"]
