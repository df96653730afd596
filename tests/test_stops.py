"""SIGTERM in the long stages of a tiny run (extraction, fold planning, scoring) stops it within seconds with one
line saying what was kept and how to resume, leaves no temporary file, and the rerun ends with the results of an
uninterrupted run; plus the stop mechanism itself (a stop reaches the next safe point, the grace period, a second
signal).

The stopped runs are subprocesses started through a runner script this test writes: it pauses after each unit of
work (a cache shard written, a fold planned, a batch of test questions scored) and announces it on stderr, so the
signal lands at a known point and a unit finished after the signal would show up as a further announcement.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_cli_args
from test_ddp_stages import bundles_in, write_data

from es_lightning.cli import main
from es_lightning.stopping import check_stop, run_stoppable, signals, stage

MARK = "STOP-TEST"
RUNNER = f'''
import sys, time
import es_lightning.data.cache as cache
import es_lightning.evaluation.stage as test_stage
from es_lightning.evaluation.protocol import Evaluator
from es_lightning.cli import main

def announce_after(owner, name, unit):
    real = getattr(owner, name)
    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        print("{MARK}", unit, file=sys.stderr, flush=True)
        time.sleep(0.5)
        return result
    setattr(owner, name, wrapped)

owner, name, unit = {{"extraction": (cache.PairedCache, "write_shard", "shard"),
                      "planning": (Evaluator, "plan", "fold"),
                      "scoring": (test_stage.CrossValidatedTest, "step", "batch")}}[sys.argv[1]]
announce_after(owner, name, unit)
main(sys.argv[2:])
'''
STOP_WITHIN = 10.0  # s from the signal to the exit: a safe point within 1 s, then ~3 s of interpreter exit on 2 cores


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir):
    """A tiny run fitted without interruption (in this process), and the arguments to repeat it or test it."""
    root = tmp_path_factory.mktemp("stops")
    (root / "runner.py").write_text(RUNNER)
    data = write_data(root / "mc.jsonl", 24)  # 48 rows: 3 shards of 16 per model; 2 batches of 16 test questions
    base = tiny_cli_args(tiny_gpt2_dir, tiny_llama_dir, data, root / "runs")
    main(["fit", *base, "--data.cache_dir", str(root / "cache"), "--run_name", "straight"])
    test = [
        "test",
        *base,
        "--data.cache_dir",
        str(root / "cache"),
        "--run_name",
        "straight",
        "--ckpt_path",
        str(root / "runs" / "straight" / "last.ckpt"),
    ]
    return SimpleNamespace(root=root, base=base, test=test)


@pytest.fixture(scope="module")
def straight_report(tiny_run) -> dict:
    """The report of an uninterrupted test of the tiny run."""
    main([*tiny_run.test, "--model.report_dir", str(tiny_run.root / "report-straight")])
    return json.loads((tiny_run.root / "report-straight" / "report.json").read_text())


def stop_after_first(root: Path, unit: str, args: list[str]) -> SimpleNamespace:
    """Run ``es-lightning args`` through the runner, send SIGTERM when the first ``unit`` of work is announced, and
    return the exit status, the seconds from the signal to the exit, the stop lines and the units finished after."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    process = subprocess.Popen(
        [sys.executable, str(root / "runner.py"), unit, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    before = []
    for line in process.stderr:
        before.append(line)
        if line.startswith(MARK):
            break
    else:
        process.wait()
        pytest.fail(f"The run ended before its first {unit} (status {process.returncode}):\n{''.join(before)[-3000:]}")
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        rest = process.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"The run did not stop within 60 s of SIGTERM during {unit}.")
    lines = rest.splitlines()
    return SimpleNamespace(
        status=process.returncode,
        seconds=time.monotonic() - signalled,
        stderr=rest,
        stops=[line for line in lines if line.startswith("es-lightning: stopped by")],
        later_units=[line for line in lines if line.startswith(MARK)],
    )


def assert_clean_stop(stopped: SimpleNamespace, during: str, args: list[str], root: Path) -> str:
    """Exit 143 within seconds, at the first safe point, with exactly one stop line naming ``during`` and the command
    that resumes; no temporary file anywhere. Returns the line."""
    assert stopped.status == 143, stopped.stderr[-3000:]
    assert stopped.seconds < STOP_WITHIN, f"{stopped.seconds:.1f} s from SIGTERM to exit"
    assert stopped.later_units == [], "work went on after the signal instead of stopping at the next safe point"
    assert len(stopped.stops) == 1, stopped.stderr[-3000:]
    line = stopped.stops[0]
    assert f"stopped by SIGTERM during {during};" in line and "nothing half-written is left" in line, line
    assert line.endswith(f"Resume with: {shlex.join(['es-lightning', *args])}"), line
    leftovers = [str(p) for p in root.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == [], leftovers
    return line


def test_sigterm_during_extraction_keeps_whole_shards_and_the_rerun_fits_the_same(tiny_run):
    root = tiny_run.root
    args = ["fit", *tiny_run.base, "--data.cache_dir", str(root / "cache-stopped"), "--run_name", "stopped"]
    stopped = stop_after_first(root, "extraction", args)
    line = assert_clean_stop(stopped, "fit > building the labelled cache", args, root)
    assert "kept 1 of 6 shard files of the cache" in line, line
    assert f"nothing in {root / 'runs' / 'stopped'} yet" in line, line
    assert not (root / "runs" / "stopped" / "last.ckpt").exists()

    main(args)  # the command the line gives
    log = [
        json.loads(row)
        for folder in (root / "cache-stopped" / "paired").iterdir()
        for row in (folder / "build-log.jsonl").read_text().splitlines()
    ]
    built = [(entry["shard"], entry["side"]) for entry in log]
    assert len(built) == 6 and len(set(built)) == 6, built  # the kept shard file was reused, not extracted again
    straight, resumed = root / "runs" / "straight", root / "runs" / "stopped"
    assert json.loads((resumed / "pairing.json").read_text()) == json.loads((straight / "pairing.json").read_text())
    bundles, expected = bundles_in(resumed / "bundles"), bundles_in(straight / "bundles")
    assert bundles and sorted(bundles) == sorted(expected)  # an empty bundles/ folder would compare equal
    for method, bundle in bundles.items():
        for layer, vector in bundle.vectors.items():
            assert torch.equal(vector, expected[method].vectors[layer]), (method, layer)


def test_sigterm_in_fold_planning_then_in_scoring_and_the_rerun_writes_the_same_report(tiny_run, straight_report):
    root = tiny_run.root
    report_dir = root / "report-resumed"
    args = [*tiny_run.test, "--model.report_dir", str(report_dir)]

    line = assert_clean_stop(stop_after_first(root, "planning", args), "test > fold planning", args, root)
    assert "kept no results of this test (fold plans and scores are recomputed" in line, line
    line = assert_clean_stop(stop_after_first(root, "scoring", args), "test > scoring test questions", args, root)
    assert "kept no results of this test" in line, line
    assert not report_dir.exists()

    main(args)
    # Both reports come from the same checkpoint, so no field may differ (not even meta.checkpoint).
    resumed = json.loads((report_dir / "report.json").read_text())
    assert resumed["meta"]["fold_plans"] and len(resumed["datasets"][0]["methods"]) == 5
    assert resumed == straight_report


def resume_as(*args: str) -> list[str]:
    return ["demo", *args]


def test_a_stop_ends_the_loop_at_its_next_check_with_one_line(capsys):
    before = signal.getsignal(signal.SIGTERM)
    done = []

    def loop() -> None:
        with stage("demo"), stage("loop", kept=lambda: f"{len(done)} items"):
            for item in range(1000):
                if item == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                check_stop()
                done.append(item)

    with pytest.raises(SystemExit) as ended:
        run_stoppable(loop, "demo", lambda: resume_as("--again"), lambda: "a run folder")
    assert ended.value.code == 130 and done == [0, 1, 2]
    assert capsys.readouterr().err == (
        "demo: stopped by SIGINT during demo > loop; kept 3 items; a run folder; "
        "nothing half-written is left. Resume with: demo --again\n"
    )
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert run_stoppable(lambda: 7, "demo", resume_as) == 7


def test_work_without_safe_points_is_stopped_after_the_grace_period_or_by_a_second_signal(monkeypatch, capsys):
    monkeypatch.setattr(signals, "GRACE_SECONDS", 0.3)

    def busy(signals_sent: int) -> None:
        with stage("busy"):
            for _ in range(signals_sent):
                os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # no check_stop: only the grace period or a second signal ends it
                time.sleep(0.01)

    for signals_sent in (1, 2):
        start = time.monotonic()
        with pytest.raises(SystemExit) as ended:
            run_stoppable(lambda sent=signals_sent: busy(sent), "demo", resume_as)
        assert ended.value.code == 143 and time.monotonic() - start < (2 if signals_sent == 1 else 0.25)
        assert "demo: stopped by SIGTERM during busy; kept nothing;" in capsys.readouterr().err
