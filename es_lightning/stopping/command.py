"""A console command with clean stops: :func:`run_stoppable` installs the handlers, turns a stop into one line and
an exit status, and shares any other error with the other ranks."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

from es_lightning.stopping.ranks import Watchdog, outlive_rank_zero, share_failure, this_rank
from es_lightning.stopping.signals import StopRequested, describe, disarm, install, restore, state

T = TypeVar("T")

# Errors that mean "the input is wrong" (a path, an option value, a model name, a machine too small): the product
# raises them with the problem and its fix in the message, so a command prints that message alone.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, MemoryError)


def stop_message(command: str, stop: StopRequested, resume: list[str], kept: Callable[[], str] | None = None) -> str:
    """The one line a stopped command prints: the signal, the step, what was kept and the command that resumes."""
    held = "; ".join(text for text in (stop.kept, describe(kept)) if text) or "nothing"
    where = f" during {stop.stage}" if stop.stage else ""
    return (
        f"{command}: stopped by {stop.signal_name}{where}; kept {held}; nothing half-written is left. "
        f"Resume with: {shlex.join(resume)}"
    )


def run_stoppable(
    main: Callable[[], T],
    command: str,
    resume: Callable[[], list[str]],
    kept: Callable[[], str] | None = None,
    traceback: bool = True,
) -> T:
    """Run a console command's ``main()`` with clean stops and shared failures; return what it returns.

    A stop prints :func:`stop_message` to stderr (on rank 0) and raises ``SystemExit(128 + signal)``: 143 for
    SIGTERM, 130 for SIGINT; ``resume()`` gives the command line that continues the run, ``kept()`` what the run
    folder holds. Any other error is published to the other ranks (DDP) and re-raised; a rank whose own error
    follows another rank's failure raises that failure instead, so every rank ends with the same message. Ranks
    other than 0 end after rank 0 (see :func:`~es_lightning.stopping.ranks.outlive_rank_zero`).
    With ``traceback=False`` (a console command without ``--verbose``), an input error (:data:`INPUT_ERRORS`)
    prints ``<command>: error: <message>`` alone on rank 0 and raises ``SystemExit(2)``.
    Nested calls, and calls outside the main thread, just run ``main()``.
    """
    if state.active or threading.current_thread() is not threading.main_thread():
        return main()
    previous = install()
    state.active = True
    watchdog = Watchdog(command)
    watchdog.start()
    try:
        return main()
    except BaseException as error:
        watchdog.stop()
        disarm()
        stop = _as_stop(error)
        share_failure(stop or error)
        if stop is not None and this_rank() == 0:
            print(stop_message(command, stop, resume(), kept), file=sys.stderr, flush=True)
        outlive_rank_zero()
        if stop is not None:
            raise SystemExit(stop.exit_code) from None
        failure = state.peer if state.peer is not None and state.peer is not error else error
        if not traceback and isinstance(failure, INPUT_ERRORS):
            if this_rank() == 0:
                print(
                    f"{command}: error: {failure}\n(run again with --verbose for the traceback)",
                    file=sys.stderr,
                    flush=True,
                )
            raise SystemExit(2) from None
        if failure is not error:
            raise failure from error
        raise
    finally:
        watchdog.stop()
        restore(previous)
        state.active = False


def _as_stop(error: BaseException) -> StopRequested | None:
    """The stop behind ``error``: itself, or (after a signal, e.g. Lightning's own SIGTERM exit or a collective torn
    down by a stopping rank) a stop for the signal received here or by another rank."""
    if isinstance(error, StopRequested):
        return error
    if state.signum is not None:
        stop = StopRequested(signal.Signals(state.signum).name)
    elif isinstance(state.peer, StopRequested):
        stop = StopRequested(state.peer.signal_name)
    else:
        return None
    stop.stage, stop.kept = state.stopped_stage, state.stopped_kept
    return stop
