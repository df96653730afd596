"""Console output: our progress at INFO on stdout, problems at WARNING, known third-party notices silenced."""

import logging
import warnings

import pytest

from es_lightning import console
from es_lightning.data.resolve import resolve_data_path


@pytest.fixture(autouse=True)
def restore_console():
    yield
    console.configure("default")


def test_progress_is_info_on_stdout_and_problems_are_labelled(capsys):
    console.configure("default")
    logging.getLogger("es_lightning.x").info("step done in 1.0 s")
    logging.getLogger("es_lightning.x").debug("details")
    logging.getLogger("es_lightning.x").warning("something is off")
    logging.getLogger("lightning.pytorch.x").info("GPU available: False")
    out = capsys.readouterr().out
    assert out.splitlines() == ["step done in 1.0 s", "WARNING es_lightning.x: something is off"]


def test_quiet_and_verbose_levels(capsys):
    console.configure("quiet")
    logging.getLogger("es_lightning.x").info("step done")
    logging.getLogger("es_lightning.x").warning("problem")
    assert capsys.readouterr().out.splitlines() == ["WARNING es_lightning.x: problem"]
    console.configure("verbose")
    logging.getLogger("es_lightning.x").debug("details")
    logging.getLogger("lightning.pytorch.x").info("GPU available: False")
    logging.getLogger("lightning.pytorch.x").info("💡 Tip: install something")
    assert capsys.readouterr().out.splitlines() == ["details", "GPU available: False"]
    with pytest.raises(ValueError, match="exclude each other"):
        console.verbosity_from_flags(True, True)


def test_known_notices_are_silenced_and_other_warnings_are_shown(capsys):
    console.configure("default")
    warnings.warn("Checkpoint directory /x/runs/default exists and is not empty.", UserWarning, stacklevel=1)
    warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed as a dependency", UserWarning, stacklevel=1)
    warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", UserWarning, stacklevel=1)
    warnings.warn("some API is deprecated", DeprecationWarning, stacklevel=1)
    warnings.warn("a real problem", UserWarning, stacklevel=1)
    out = capsys.readouterr().out
    assert "a real problem" in out and out.count("WARNING py.warnings") == 1


def test_a_data_path_fallback_is_announced_with_the_path_used(tmp_path, caplog):
    shared = tmp_path / "shared" / "data" / "mine.jsonl"
    shared.parent.mkdir(parents=True)
    shared.write_text("{}\n")
    with caplog.at_level(logging.WARNING, logger="es_lightning"):
        got = resolve_data_path("missing/mine.jsonl", search_from=tmp_path / "checkout", hub=None)
    assert got == str(shared)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "'missing/mine.jsonl' does not exist" in caplog.text and str(shared) in caplog.text
