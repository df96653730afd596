"""The main job (fit -> test -> predict) on tiny models, in-process: output, reuse, and nothing stale."""

import json
from pathlib import Path

import pytest
from conftest import tiny_job

from es_lightning.evaluation.report import chosen_coefficients, load_report
from es_lightning.pipeline import main

CONF = Path(__file__).parent / "conf" / "tiny.yaml"


@pytest.fixture()
def job(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    args, prompts = tiny_job(tmp_path, tiny_gpt2_dir, tiny_llama_dir)
    args += ["--output_dir", str(tmp_path / "runs")]
    return args, tmp_path / "runs" / "default", prompts


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "WARNING" in line or "Warning:" in line]


def test_pipeline_runs_every_stage_quietly_and_prints_where_results_are(job, capsys):
    args, run, _ = job
    main(args)
    captured = capsys.readouterr()
    out = captured.out
    assert not warning_lines(out) and not warning_lines(captured.err), warning_lines(out + captured.err)
    for stage in ("1/3 fit", "fit: done in", "2/3 test", "test: done in", "3/3 predict", "predict: done in", "done in"):
        assert stage in out
    assert "| two | expertsteer |" in out  # the report table
    assert "[a] what is the cat ?" in out and "unsteered" in out and "expertsteer x" in out
    for name in ("last.ckpt", "report/report.md", "predictions.jsonl", "predictions.md", "bundles"):
        assert str(run / name) in out and (run / name).exists()
    assert not list(run.glob("best-*.ckpt"))  # never written: it would carry no pairs or bundles
    markdown = (run / "predictions.md").read_text()
    assert "## a" in markdown and "> what is the cat ?" in markdown and "| unsteered |" in markdown
    # the same command again continues: nothing finished is computed twice
    main(args)
    captured = capsys.readouterr()
    assert "fit already complete" in captured.out and "report already made from this checkpoint" in captured.out
    assert "Predictions already complete" in captured.out and not warning_lines(captured.out + captured.err)


def test_nothing_stale_is_reused_and_predict_uses_the_chosen_coefficients(job, capsys):
    args, run, prompts = job
    args = [
        *args,
        "--model.evaluation.budget",
        "{max_kl: null, max_empty_increase: null, max_repetition_increase: null}",
    ]
    main([*args, "--skip", "predict"])
    report = run / "report" / "report.json"
    first = report.read_bytes()
    # another evaluation option: the report is made again, and predict takes each method's chosen coefficient
    main([*args, "--model.evaluation.coefficients", "[-0.25, 0.25]"])
    out = capsys.readouterr().out
    assert "report already made" not in out and report.read_bytes() != first
    chosen = chosen_coefficients(load_report(report))
    assert {abs(c) for c in chosen.values()} == {0.25}
    predicted = {(r["method"], r["coefficient"]) for r in rows(run / "predictions.jsonl")}
    assert predicted == {
        ("none", 0.0),
        ("expertsteer", chosen["expertsteer"]),
        ("mean_difference", chosen["mean_difference"]),
    }
    # a budget no coefficient meets: the report says so and predict generates the methods not at all
    main([*args, "--model.evaluation.coefficients", "[-0.25, 0.25]", "--model.evaluation.budget.max_kl", "0"])
    assert set(chosen_coefficients(load_report(report)).values()) == {0.0}
    assert {r["method"] for r in rows(run / "predictions.jsonl")} == {"none"}
    # without the report's choice, the config's coefficient (tiny.yaml: 0.5)
    fixed = [
        *args,
        "--model.evaluation.coefficients",
        "[-0.25, 0.25]",
        "--model.predict.coefficients_from_report",
        "false",
    ]
    main(fixed)
    assert {r["coefficient"] for r in rows(run / "predictions.jsonl")} == {0.0, 0.5}
    capsys.readouterr()
    main(fixed)  # the same command again: every prediction is reused ...
    assert "Predictions already complete" in capsys.readouterr().out
    # ... and after an edit of the prompts file alone (nothing else changed), generated again
    prompts.write_text('{"id": "a", "prompt": "what is the dog ?"}\n{"id": "b", "prompt": "where is the sun ?"}\n')
    main(fixed)
    out = capsys.readouterr().out
    assert "Predictions already complete" not in out and "[a] what is the dog ?" in out
    assert {r["prompt"] for r in rows(run / "predictions.jsonl")} == {"what is the dog ?", "where is the sun ?"}


def test_report_dir_is_where_the_report_is_made_read_and_reused(job, tmp_path, capsys):
    args, run, _ = job
    elsewhere = tmp_path / "reports"
    main([*args, "--model.report_dir", str(elsewhere), "--quiet"])
    out = capsys.readouterr().out
    assert (elsewhere / "report.json").exists() and not (run / "report").exists()
    assert str(elsewhere / "report.md") in out and "| two | expertsteer |" in out
    assert "=== 1/3 fit" not in out and "done in" in out  # --quiet: results only, no progress lines
    main([*args, "--model.report_dir", str(elsewhere)])
    out = capsys.readouterr().out
    assert "report already made from this checkpoint" in out and str(elsewhere / "report.json") in out
    assert "Steering coefficients chosen by test (" + str(elsewhere / "report.json") in out
