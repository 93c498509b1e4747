"""settle_after_startup: start-up garbage is collected, not frozen; what is alive is frozen."""

from __future__ import annotations

import gc
import weakref

from shared.heap import settle_after_startup


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_garbage_is_collected_before_the_rest_is_frozen() -> None:
    gc.unfreeze()
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle: only the cyclic collector frees it
    gone = weakref.ref(a)
    kept = _Node()
    del a, b
    try:
        frozen = settle_after_startup()
        assert gone() is None
        assert frozen == gc.get_freeze_count() > 0
        assert all(o is not kept for o in gc.get_objects())  # in the permanent generation: never traversed
    finally:
        gc.unfreeze()
