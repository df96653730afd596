"""Clean stops, and ranks that fail together.

**Signals** (:mod:`~es_lightning.stopping.signals`). :func:`run_stoppable` wraps every console command. Its
SIGTERM/SIGINT handler only records the signal; long loops call :func:`check_stop` at safe points (between extraction
batches and shards, pair-search layers, folds, scoring and generation batches, and after each batch of Lightning's
loops), which raises :class:`StopRequested`. Work that reaches no safe point within ``GRACE_SECONDS`` (3 s: a model
conversion, one long library call) gets the exception raised wherever it is; a second signal raises it at once.
Files are written to a temporary name and renamed (:mod:`es_lightning.io`), and that cleanup runs as the exception
passes, so a stop leaves only whole files. :func:`stage` names the step that was stopped and what it keeps. The
command prints one line and exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT)::

    es-lightning: stopped by SIGTERM during test > fold planning; kept ...; Resume with: es-lightning test ...

**Ranks** (:mod:`~es_lightning.stopping.ranks`, DDP). A rank whose command fails or stops publishes the error in the
process group's store (the rendezvous TCPStore, reachable while collectives block). A watchdog thread on every rank
reads it and stops that rank with the same error at its next safe point; a rank still blocked (in a collective)
``ABANDON_SECONDS`` (20 s) later is ended with the message. Work one rank does for all (:func:`on_rank_zero`) and
work every rank does for itself (:func:`on_every_rank`) do not park the other ranks in a collective: they poll the
store, so however long the work takes they never meet the collective timeout, and they wake within 0.1 s when it
ends, fails, or a signal arrives. A rank whose heartbeat stops for the collective timeout (``trainer.strategy.timeout``)
is taken as lost.
"""

from es_lightning.stopping.command import run_stoppable, stop_message
from es_lightning.stopping.ranks import RankLost, on_every_rank, on_rank_zero
from es_lightning.stopping.signals import StopRequested, check_stop, stage

__all__ = [
    "RankLost",
    "StopRequested",
    "check_stop",
    "on_every_rank",
    "on_rank_zero",
    "run_stoppable",
    "stage",
    "stop_message",
]
