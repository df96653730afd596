"""Ranks that fail together (DDP): failures shared through the process group's store, waits that poll it, and a
watchdog thread per rank (heartbeat, other ranks' failures, a rank blocked after a stop)."""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from es_lightning.stopping.signals import StopRequested, arm, check_stop, state

T = TypeVar("T")

ABANDON_SECONDS = 20.0  # a rank still running this long after a stop or a peer's failure exits at once
ACK_SECONDS = 5.0  # how long the failing rank waits for the others to read its error (rank 0 hosts the store)
POLL_SECONDS = 0.1
BEAT_SECONDS = 0.5
_KEY = "es_lightning/"


class RankLost(RuntimeError):
    """Another rank stopped answering (killed, or rank 0, the store's host, is gone) while this rank waited for it."""


class Ranks:
    """This process's rank in the default process group, and the group's store."""

    def __init__(self, group: Any, store: Any, rank: int, world: int):
        self.group, self.store, self.rank, self.world = group, store, rank, world
        self.calls = 0
        self.timeout = store.timeout.total_seconds()  # the collective timeout the group was created with
        self.beats: dict[int, tuple[int, float]] = {}  # rank -> (last heartbeat count, when it changed)
        self.checked_beats = 0.0

    def next_key(self) -> str:
        self.calls += 1  # every rank makes the same calls in the same order, so the keys agree
        return f"{_KEY}work/{self.calls}"

    def wait(self, key: str, count: int, what: str, ranks: list[int]) -> None:
        """Poll until ``count`` ranks have added to ``key``; raise on a stop, another rank's failure or a lost rank."""
        while True:
            check_stop()
            try:
                if self.store.add(key, 0) >= count:
                    return
                take_failure(self.store, self)
                check_stop()
                self.check_alive(ranks, what)
            except RankLost:
                raise
            except (RuntimeError, OSError) as err:  # the store's own errors: its host, rank 0, is gone
                raise RankLost(
                    f"Lost contact with rank 0, which hosts the process group's store, while waiting for "
                    f"{what}: it has probably failed or been killed. See its log."
                ) from err
            time.sleep(POLL_SECONDS)

    def check_alive(self, ranks: list[int], what: str) -> None:
        """Raise :class:`RankLost` if one of ``ranks`` has sent no heartbeat for the collective timeout."""
        now = time.monotonic()
        if now - self.checked_beats < 5 * BEAT_SECONDS:
            return
        self.checked_beats = now
        for rank in ranks:
            count = self.store.add(f"{_KEY}beat/{rank}", 0)
            last, since = self.beats.get(rank, (-1, now))
            if count != last or count == 0:
                self.beats[rank] = (count, now)
            elif now - since > self.timeout:
                raise RankLost(
                    f"Rank {rank} has given no sign of life for {now - since:.0f} s while this rank waited for {what}; "
                    f"it was probably killed (out of memory?). See its log. The limit is the collective timeout "
                    f"(trainer.strategy.timeout)."
                )

    def broadcast(self, value: T) -> T:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


_lock = threading.Lock()
_current: list[Ranks] = []


def current() -> Ranks | None:
    """This process's :class:`Ranks`, or None outside a process group of two or more ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from torch.distributed import distributed_c10d

    group = distributed_c10d._get_default_group()
    with _lock:  # the watchdog thread asks too: one object per group, or the call counters would split
        if not _current or _current[0].group is not group:
            _current[:] = [Ranks(group, distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size())]
        return _current[0]


def this_rank() -> int:
    """The global rank (0 outside DDP)."""
    ranks = current()
    return ranks.rank if ranks is not None else 0


def _run_shared(work: Callable[[], T]) -> T:
    try:
        return work()
    except BaseException as error:
        publish_failure(error)
        raise


def on_rank_zero(compute: Callable[[], T], what: str) -> T:
    """``compute()`` on rank 0, its result handed to every rank; an error or stop on rank 0 is raised on every rank.
    The other ranks wait by polling the store, not in a collective, so the work may take longer than the collective
    timeout. Outside DDP: ``compute()``. ``what`` names the work in errors."""
    ranks = current()
    if ranks is None:
        return compute()
    key = ranks.next_key()
    result: T | None = None
    if ranks.rank == 0:
        result = _run_shared(compute)
        ranks.store.add(key, 1)
    else:
        ranks.wait(key, 1, what, [0])
    return cast(T, ranks.broadcast(result))  # every rank gets rank 0's result, never the other ranks' None


def on_every_rank(work: Callable[[], T], what: str) -> list[T]:
    """``work()`` on every rank; returns every rank's result in rank order. An error or stop on any rank is raised
    on every rank as soon as it happens, not when the others finish. Outside DDP: ``[work()]``."""
    ranks = current()
    if ranks is None:
        return [work()]
    key = ranks.next_key()
    result = _run_shared(work)
    ranks.store.add(key, 1)
    ranks.wait(key, ranks.world, what, [r for r in range(ranks.world) if r != ranks.rank])
    return ranks.gather(result)


def publish_failure(error: BaseException) -> None:
    """Record ``error`` as the run's failure in the store, unless this rank already did or another rank's came
    first (``state.published`` says whether this rank's is the recorded one)."""
    ranks = current()
    if ranks is None or state.published or error is state.peer:
        return
    try:
        payload = pickle.dumps((ranks.rank, error))
    except Exception:  # noqa: BLE001 - an error that does not pickle travels as its text
        payload = pickle.dumps((ranks.rank, RuntimeError(f"{type(error).__name__}: {error}")))
    with contextlib.suppress(Exception):  # a store that is gone: the other ranks see this process end instead
        state.published = ranks.store.compare_set(f"{_KEY}failure", "", payload) == payload


def share_failure(error: BaseException) -> None:
    """Publish ``error``; if it is the run's failure, give the other ranks up to ``ACK_SECONDS`` to read it, else read
    (and acknowledge) the failure another rank published first."""
    publish_failure(error)
    ranks = current()
    if ranks is None:
        return
    if not state.published:
        with contextlib.suppress(Exception):
            take_failure(ranks.store, ranks)
        return
    deadline = time.monotonic() + ACK_SECONDS
    with contextlib.suppress(Exception):
        while ranks.store.add(f"{_KEY}acks", 0) < ranks.world - 1 and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)


def outlive_rank_zero() -> None:
    """On a rank other than 0 that ends with an error or a stop: wait, at most ``ABANDON_SECONDS``, until rank 0 has
    ended (its store is gone). Lightning's launcher kills every process as soon as a rank it started fails, and would
    otherwise kill rank 0 in the middle of its own cleanup."""
    ranks = current()
    if ranks is None or ranks.rank == 0:
        return
    deadline = time.monotonic() + ABANDON_SECONDS
    while time.monotonic() < deadline:
        try:
            ranks.store.check([f"{_KEY}failure"])
        except Exception:  # noqa: BLE001 - the store went with rank 0
            return
        time.sleep(POLL_SECONDS)


def take_failure(store: Any, ranks: Ranks) -> bool:
    """If another rank published a failure, make it this rank's pending error (acknowledged once); True if new."""
    if state.peer is not None or not store.check([f"{_KEY}failure"]):
        return False
    try:
        origin, error = pickle.loads(store.get(f"{_KEY}failure"))
    except Exception:  # noqa: BLE001 - an error class this rank cannot load
        origin, error = -1, RuntimeError("Another rank failed; its error could not be read here. See its log.")
    if origin == ranks.rank:
        return False
    error.add_note(f"(raised on rank {origin}; rank {ranks.rank} stops with it)")
    state.peer = error
    state.mark_pending()
    if not state.acked:
        state.acked = True
        store.add(f"{_KEY}acks", 1)
    return True


def _own_connection(store: Any) -> Any:
    """A second client of ``store`` for the watchdog thread (the store itself where it cannot be cloned)."""
    try:
        return store.clone()
    except (AttributeError, RuntimeError):
        return store


class Watchdog(threading.Thread):
    """Under DDP: this rank's heartbeat, other ranks' failures turned into a stop here, and the end of a rank that
    stays blocked after a stop. Idle (one check per beat) outside DDP."""

    def __init__(self, command: str):
        super().__init__(name="es-lightning-watchdog", daemon=True)
        self.command = command
        self.done = threading.Event()

    def stop(self) -> None:
        """End the thread and wait for it, so it cannot arm the grace alarm after the command has disarmed it."""
        self.done.set()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=4 * BEAT_SECONDS)

    def run(self) -> None:
        owner: Ranks | None = None  # the Ranks whose store this thread has its own client of
        store: Any = None
        while not self.done.wait(BEAT_SECONDS):
            try:
                ranks = current()
                if ranks is None:
                    continue
                if ranks is not owner:
                    owner, store = ranks, _own_connection(ranks.store)
                store.add(f"{_KEY}beat/{ranks.rank}", 1)
                if take_failure(store, ranks):
                    arm()
            except Exception:  # noqa: BLE001 - the process group or its store is gone: the run is ending anyway
                return
            self.abandon_if_stuck(ranks)

    def abandon_if_stuck(self, ranks: Ranks) -> None:
        """End the process if a stop or a peer's failure has been pending for ``ABANDON_SECONDS`` (the main thread is
        blocked, e.g. in a collective that will never complete)."""
        pending = state.pending_since
        if pending is None or time.monotonic() - pending < ABANDON_SECONDS or self.done.is_set():
            return
        error = state.pending()
        code = error.exit_code if isinstance(error, StopRequested) else 1
        print(
            f"{self.command}: rank {ranks.rank} ends now, {ABANDON_SECONDS:.0f} s after this stop without reaching a "
            f"safe point (blocked in a collective?): {error}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(code)
