"""What the ``es-lightning`` commands print: the one place that configures logging and silences notices.

Three verbosities, chosen by ``--quiet`` / ``--verbose`` on ``es-lightning-pipeline`` (and before the subcommand
of ``es-lightning``: ``es-lightning --quiet fit ...``):

============  =====================================================================================================
``quiet``     WARNING and above only: problems, never progress; the pipeline also turns progress bars off.
``default``   our progress (INFO records of the ``es_lightning`` loggers: one line per step, with its time) and
              every WARNING. Lightning's own INFO lines (accelerator summary, seed, checkpoint restored) are hidden.
``verbose``   DEBUG for ``es_lightning``, Lightning's INFO lines, and no notice silenced.
============  =====================================================================================================

Records go to stdout, so progress, problems and the results the commands print appear in order; INFO
records are printed as their message, WARNING and above as ``WARNING <logger>: <message>``. Python warnings
(``warnings.warn``, which Lightning uses for its notices) are routed through logging (logger ``py.warnings``),
so they look the same.

Silenced (except with ``verbose``), because they carry no information for this workflow -- see :data:`NOISE`:

- Lightning's notice that ``tensorboardX`` is no longer a dependency (the CSV logger it falls back to is what
  we want) and its "Tip" lines advertising cloud products (``litlogger``, ``litmodels``);
- ``isinstance(treespec, LeafSpec)`` deprecation from Lightning's ``_pytree`` helper (an upstream internal);
- "Checkpoint directory ... exists and is not empty": the run folder always holds ``config.yaml`` before the
  first checkpoint (and fitting into a folder that holds ``last.ckpt`` is refused by the CLI itself);
- "does not have many workers": our dataloaders serve tensors already in memory or a handful of prompts;
- "The number of training batches (n) is smaller than the logging interval": a small labelled set gives a few
  batches per epoch; the loss is still logged every ``log_every_n_steps`` global steps, across epochs;
- ``DeprecationWarning`` / ``PendingDeprecationWarning`` raised inside libraries (e.g. jsonargparse's notes on
  the API Lightning's CLI calls): addressed to those libraries' callers, not to users; Python hides them by
  default too, test runners do not.

Library code never calls :func:`configure`; only the console entry points do.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Literal

Verbosity = Literal["quiet", "default", "verbose"]

# (message regex, why it is silenced) for ``warnings.filterwarnings``; matched at the start of the message.
NOISE: tuple[tuple[str, str], ...] = (
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", "Lightning falls back to the CSV logger, as intended"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "an upstream deprecation inside Lightning"),
    (r"Checkpoint directory .* exists and is not empty", "the run folder holds config.yaml before any checkpoint"),
    (r"The '\w+' does not have many workers", "in-memory tensors and short prompt lists need no workers"),
    (r"The number of training batches \(\d+\) is smaller than the logging interval", "logged across epochs anyway"),
)
# Lightning INFO records that are advertisements, hidden even at the default level (INFO is hidden anyway;
# with --verbose Lightning's INFO is shown, but these still say nothing about the run).
_TIPS = ("💡 Tip:",)

_HANDLER_NAME = "es_lightning.console"


class _StdoutHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stdout`` is at the time (so pytest's capture sees it)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.set_name(_HANDLER_NAME)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property always reads sys.stdout
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{record.levelname} {record.name}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_TIPS)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.warn`` -> one WARNING record of the ``py.warnings`` logger, saying where it came from."""
    logging.getLogger("py.warnings").warning("%s: %s (%s:%s)", category.__name__, message, filename, lineno)


def verbosity_from_flags(quiet: bool, verbose: bool) -> Verbosity:
    """``--quiet`` / ``--verbose`` -> a verbosity; both at once is an error."""
    if quiet and verbose:
        raise ValueError("--quiet and --verbose exclude each other: give one of them.")
    return "quiet" if quiet else "verbose" if verbose else "default"


def configure(verbosity: Verbosity = "default") -> None:
    """Set up logging and warning filters for a console command (idempotent; later calls change the level)."""
    if verbosity not in ("quiet", "default", "verbose"):
        raise ValueError(f"Unknown verbosity {verbosity!r}: use quiet, default or verbose.")
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = _StdoutHandler()
        handler.setFormatter(_Formatter())
        handler.addFilter(_DropTips())
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    ours = {"quiet": logging.WARNING, "default": logging.INFO, "verbose": logging.DEBUG}[verbosity]
    logging.getLogger("es_lightning").setLevel(ours)

    # Lightning adds its own stderr handler when imported before logging is configured; route it through ours.
    lightning = logging.getLogger("lightning.pytorch")
    for stray in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
        lightning.removeHandler(stray)
    lightning.propagate = True
    level = logging.INFO if verbosity == "verbose" else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(level)

    warnings.showwarning = _show_warning  # set each time: test runners swap it per test
    if verbosity != "verbose":
        for category in (DeprecationWarning, PendingDeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
        for pattern, _why in NOISE:
            warnings.filterwarnings("ignore", message=pattern)
    if verbosity == "quiet":  # the bars of transformers (weights loading) and datasets (JSON conversion)
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
