"""Stop signals: the handler records SIGTERM/SIGINT, :func:`check_stop` raises :class:`StopRequested` at safe points,
and a stop that reaches none within :data:`GRACE_SECONDS` is raised wherever the main thread is."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

GRACE_SECONDS = 3.0  # a stop that meets no check_stop within this is raised wherever the main thread is
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(BaseException):
    """A stop signal asked the run to end. A ``BaseException`` (like ``KeyboardInterrupt``), so ``except Exception``
    lets it pass. ``stage`` / ``kept``: the step it interrupted and what that step keeps (set by :func:`stage`)."""

    def __init__(self, signal_name: str = "SIGTERM", forced: bool = False):
        super().__init__(signal_name, forced)
        self.signal_name = signal_name
        self.forced = forced
        self.stage: str | None = None
        self.kept: str | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal."""
        return 128 + int(signal.Signals[self.signal_name])

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}" + (f" during {self.stage}" if self.stage else "")


class State:
    """What this process knows about stops: the signal received, another rank's error, the running stages."""

    def __init__(self) -> None:
        self.active = False  # run_stoppable's handlers are installed
        self.stages: list[str] = []
        self.reset()

    def reset(self) -> None:
        """Forget a stop (when the command that saw it ends)."""
        self.signum: int | None = None
        self.peer: BaseException | None = None  # another rank's error, raised here too
        self.pending_since: float | None = None
        self.acked = False  # this rank told the store it read another rank's failure
        self.published = False  # this rank's error is the run's recorded failure
        self.stopped_stage: str | None = None  # where another exception ended a stopped run (see stage)
        self.stopped_kept: str | None = None

    def pending(self) -> BaseException | None:
        """The error a safe point raises now, if any."""
        if self.signum is not None:
            return StopRequested(signal.Signals(self.signum).name)
        return self.peer

    def mark_pending(self) -> None:
        self.pending_since = self.pending_since or time.monotonic()


state = State()


def check_stop() -> None:
    """Raise :class:`StopRequested` if a stop signal arrived, or another rank's error if one failed; call it at safe
    points of long loops (between batches, shards, layers, folds)."""
    error = state.pending()
    if error is not None:
        disarm()
        raise error


@contextlib.contextmanager
def stage(name: str, kept: Callable[[], str] | None = None) -> Iterator[None]:
    """Name the step running inside (stages nest: ``test > fold planning``); ``kept()`` says what the step keeps if
    a stop interrupts it. Also usable as a decorator."""
    state.stages.append(name)
    try:
        yield
    except StopRequested as stop:
        stop.stage = stop.stage or " > ".join(state.stages)
        if stop.kept is None and kept is not None:
            stop.kept = describe(kept)
        raise
    except BaseException:
        if state.signum is not None or isinstance(state.peer, StopRequested):  # e.g. Lightning's own SIGTERM exit
            state.stopped_stage = state.stopped_stage or " > ".join(state.stages)
            if state.stopped_kept is None and kept is not None:
                state.stopped_kept = describe(kept)
        raise
    finally:
        state.stages.pop()


def describe(kept: Callable[[], str] | None) -> str | None:
    """``kept()`` on one line, or None when there is none or it fails (a description never hides the stop)."""
    try:
        return " ".join(kept().split()) if kept is not None else None
    except Exception:  # noqa: BLE001
        return None


def arm() -> None:
    """Raise the pending stop wherever the main thread is, ``GRACE_SECONDS`` from now (SIGALRM)."""
    signal.setitimer(signal.ITIMER_REAL, GRACE_SECONDS)


def disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def _on_signal(signum: int, _frame: Any) -> None:
    if state.signum is not None:  # the second signal: stop at once
        disarm()
        raise StopRequested(signal.Signals(signum).name, forced=True)
    state.signum = signum
    state.mark_pending()
    arm()


def _on_alarm(_signum: int, _frame: Any) -> None:
    error = state.pending()
    if isinstance(error, StopRequested):
        error.forced = True
    if error is not None:
        raise error


def install() -> dict[int, Any]:
    """Install the stop and grace handlers (main thread only); returns the handlers they replace."""
    previous: dict[int, Any] = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, _on_alarm)
    return previous


def restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install` replaced and forget any stop."""
    disarm()
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    state.reset()
