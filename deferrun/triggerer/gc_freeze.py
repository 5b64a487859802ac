"""Keeping the cyclic garbage collector off a triggerer's live triggers.

With 100,000 live triggers every full collection walks them all, and a burst of firings
allocates enough to start collections over and over: the loop stalled for seconds (measured:
fire lateness p99 of 30 s in a 16,700/s burst). Freezing moves what is loaded out of the
collector's reach; objects freed by reference counting are unaffected, and cyclic garbage
among frozen objects waits for the periodic unfreeze.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: freeze again after this many more live triggers
FREEZE_GROWTH = 5000
#: a full collection over everything frozen, at most this often (seconds)
UNFREEZE_EVERY = 600.0


class LoadedFreezer:
    def __init__(self) -> None:
        self._last_unfreeze = time.monotonic()
        self._frozen_at = 0

    def loaded(self, live: int) -> None:
        """``live`` triggers are loaded now: freeze once enough were added since last time."""
        if live - self._frozen_at < FREEZE_GROWTH:
            return
        now = time.monotonic()
        if now - self._last_unfreeze > UNFREEZE_EVERY:
            gc.unfreeze()
            gc.collect()
            self._last_unfreeze = now
        gc.freeze()
        self._frozen_at = live


@contextmanager
def collections_paused() -> Iterator[None]:
    """No collection while a large batch of fresh objects is made (1M result rows of a
    reconcile: one full collection over them stalled the loop for seconds)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
