"""Threads and the adapter: edits run side by side, adapter changes never in the middle of one.

A pipeline holds state for the length of a call (its scheduler's timesteps and step index, the call's guidance and
attention arguments), so two threads calling one pipeline at once break each other: upstream klein fails inside its
scheduler with an `IndexError`. diffusers' recipe is one pipeline per thread made by `from_pipe`, which shares every
model. Those pipelines still share one transformer, whose attention processors carry the adapter: a load, unload,
scale change or adaptation in one thread must not land in the middle of another thread's edit.

So every transformer gets a `ModelAccess` lock, shared by all pipelines that use it: edits take it shared (they run
in parallel), adapter changes take it exclusively (they wait for running edits and hold back new ones). A second call
of the same pipeline from another thread while one runs is refused with the recipe (`one_call_at_a_time`).
"""

from __future__ import annotations

import functools
import threading


_CREATION = threading.Lock()  # guards the lazy creation of the per-object locks below


class ModelAccess:
    """A readers-writer lock: many edits at once, or one adapter change.

    A thread that holds shared access may take exclusive access too (a step callback that changes the adapter's
    scale): it does not wait for itself, and the change lands between its own steps once no other edit runs. Two
    such callbacks in two threads' edits at once would wait for each other: change the adapter from one thread.
    """

    def __init__(self):
        self._condition = threading.Condition(threading.Lock())
        self._readers: dict[int, int] = {}  # thread id -> shared acquisitions it holds
        self._writer: int | None = None
        self._writer_depth = 0

    def _others_reading(self, me: int) -> bool:
        return any(thread != me for thread in self._readers)

    def shared(self):
        """Context manager: shared access (an edit)."""
        return _Held(self._acquire_shared, self._release_shared)

    def exclusive(self):
        """Context manager: exclusive access (a change of the adapter or its processors)."""
        return _Held(self._acquire_exclusive, self._release_exclusive)

    def _acquire_shared(self) -> None:
        me = threading.get_ident()
        with self._condition:
            self._condition.wait_for(lambda: self._writer in (None, me))
            self._readers[me] = self._readers.get(me, 0) + 1

    def _release_shared(self) -> None:
        me = threading.get_ident()
        with self._condition:
            self._readers[me] -= 1
            if not self._readers[me]:
                del self._readers[me]
            self._condition.notify_all()

    def _acquire_exclusive(self) -> None:
        me = threading.get_ident()
        with self._condition:
            self._condition.wait_for(lambda: self._writer in (None, me) and not self._others_reading(me))
            self._writer = me
            self._writer_depth += 1

    def _release_exclusive(self) -> None:
        with self._condition:
            self._writer_depth -= 1
            if not self._writer_depth:
                self._writer = None
            self._condition.notify_all()


class _Held:
    def __init__(self, acquire, release):
        self._acquire, self._release = acquire, release

    def __enter__(self):
        self._acquire()
        return self

    def __exit__(self, *exc_info):
        self._release()


def model_access(transformer) -> ModelAccess:
    """The `ModelAccess` of a transformer, shared by every pipeline that uses it (created on first use)."""
    access = transformer.__dict__.get("_delta_access")
    if access is None:
        with _CREATION:
            access = transformer.__dict__.setdefault("_delta_access", ModelAccess())
    return access


def changes_the_adapter(method):
    """Decorator of a pipeline method that changes the adapter, its processors or weights: it waits for running
    edits of every pipeline sharing the transformer, and holds back new ones while it runs."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with model_access(self.transformer).exclusive():
            return method(self, *args, **kwargs)

    return wrapper


def one_call_at_a_time(method):
    """Decorator of a pipeline's `__call__`: the call runs with shared access to the transformer, and a second call
    of the same pipeline from another thread while one runs raises a `RuntimeError` naming the recipe."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        me = threading.get_ident()
        with _CREATION:
            running = self.__dict__.get("_delta_calling")
            if running is not None and running[0] != me:
                raise RuntimeError(
                    f"This {type(self).__name__} is already editing in another thread, and a pipeline holds one "
                    f"call's state at a time. Give each thread its own: {type(self).__name__}.from_pipe(pipe) "
                    "shares every model (no extra memory) with a scheduler of its own."
                )
            self.__dict__["_delta_calling"] = (me, 1 if running is None else running[1] + 1)
        try:
            with model_access(self.transformer).shared():
                return method(self, *args, **kwargs)
        finally:
            with _CREATION:
                thread, depth = self.__dict__["_delta_calling"]
                self.__dict__["_delta_calling"] = None if depth == 1 else (thread, depth - 1)

    return wrapper
