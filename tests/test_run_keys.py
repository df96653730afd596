"""Every reuse is keyed on what it depends on: each option is declared under the stages it changes, and changing
one option reruns exactly those stages (checked by running the pipeline on tiny models, one option at a time)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_job, write_two_choice_jsonl

from es_lightning.evaluation.report import chosen_coefficients, load_report
from es_lightning.pipeline import _parsed_config, main
from es_lightning.run.keys import changed_options, stage_key, stage_options, undeclared

ROOT = Path(__file__).resolve().parents[1]
CONF = Path(__file__).parent / "conf" / "tiny.yaml"
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))
SHIPPED = [p for p in SHIPPED if "lmeval" not in p.parts]  # an lm-eval task, not an es-lightning config


@pytest.mark.parametrize("config", [CONF, *SHIPPED], ids=lambda p: p.name)
def test_every_option_is_declared_under_its_stages(config):
    on_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]  # the paper configs ask for GPUs
    assert undeclared(_parsed_config(["--config", str(config), *on_cpu])) == []


def test_stage_options_hash_the_files_they_name(tmp_path):
    data = write_two_choice_jsonl(tmp_path / "two.jsonl", 6)
    config = _parsed_config(["--config", str(CONF), "--data.data.path", str(data)])
    before = stage_options(config, "fit")
    data.write_text(data.read_text().replace("cat", "dog"))
    after = stage_options(_parsed_config(["--config", str(CONF), "--data.data.path", str(data)]), "fit")
    assert stage_key(before) != stage_key(after)
    assert changed_options(before, after) == ["data.data.path: the file's contents changed"]
    assert stage_options(config, "predictions") == stage_options(
        _parsed_config(["--config", str(CONF), "--data.data.path", str(data)]), "predictions"
    )  # the predictions never read it


def stages_run(out: str) -> set[str]:
    """Which stages a pipeline run recomputed, from what it printed."""
    ran = set()
    if "fit already complete" not in out:
        ran.add("fit")
    if "report already made" not in out:
        ran.add("report")
    if "Predictions already complete" not in out:
        ran.add("predictions")
    return ran


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir):
    """One finished tiny pipeline run: its arguments (output folder left out) and its folder."""
    root = tmp_path_factory.mktemp("reuse")
    args, _ = tiny_job(root, tiny_gpt2_dir, tiny_llama_dir)
    args += ["--model.evaluation.budget.max_kl", "null"]
    main([*args, "--output_dir", str(root / "runs")])
    return args, root


# option -> the stages that must rerun when it alone changes (hand-written: what each option means). The predictions
# depend on the report only through the coefficients it chose: they rerun after a new report iff those changed.
CASES = {
    "trainer.enable_progress_bar": (["--trainer.enable_progress_bar", "true"], set()),
    "trainer.log_every_n_steps": (["--trainer.log_every_n_steps", "7"], set()),
    "data.num_workers": (["--data.num_workers", "0", "--data.shard_size", "5"], set()),
    "model.pairing.rule": (["--model.pairing.rule", "depth"], {"fit", "report", "predictions"}),
    "trainer.max_epochs": (["--trainer.max_epochs", "1"], {"fit", "report", "predictions"}),
    "model.evaluation.random_draws": (["--model.evaluation.random_draws", "3"], {"report"}),
    "model.evaluation.folds": (["--model.evaluation.folds", "2"], {"report"}),
    "model.evaluation.coefficients": (["--model.evaluation.coefficients", "[-0.25, 0.25]"], {"report"}),
    "model.evaluation.generation.max_new_tokens": (["--model.evaluation.generation.max_new_tokens", "3"], {"report"}),
    "model.generation.max_new_tokens": (["--model.generation.max_new_tokens", "3"], {"predictions"}),
    "model.predict.positions": (["--model.predict.positions", "prompt"], {"predictions"}),
    "data.predict_batch_size": (["--data.predict_batch_size", "1"], {"predictions"}),
}


def test_an_edited_prompt_file_alone_regenerates_the_predictions(finished, tmp_path, capsys):
    args, root = finished
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    prompts = tmp_path / "moved_prompts.jsonl"
    shutil.copy(root / "prompts.jsonl", prompts)
    moved = [prompts if a.endswith("prompts.jsonl") else a for a in args]
    capsys.readouterr()
    main([*map(str, moved), "--output_dir", str(runs)])  # the same prompts under another path: reused
    assert stages_run(capsys.readouterr().out) == set()
    prompts.write_text(prompts.read_text().replace("cat", "dog"))
    main([*map(str, moved), "--output_dir", str(runs)])
    out = capsys.readouterr().out
    assert stages_run(out) == {"predictions"} and "what is the dog ?" in out


@pytest.mark.parametrize("name", list(CASES))
def test_one_changed_option_reruns_exactly_the_stages_that_depend_on_it(finished, name, tmp_path, capsys):
    args, root = finished
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    capsys.readouterr()
    main([*args, "--output_dir", str(runs)])  # unchanged: everything is reused
    assert stages_run(capsys.readouterr().out) == set()
    change, expected = CASES[name]
    report = runs / "default" / "report" / "report.json"
    predicted = ("expertsteer", "mean_difference")  # tiny.yaml's predict.methods

    def chosen() -> list[float | None]:
        return [chosen_coefficients(load_report(report)).get(m) for m in predicted]

    before = chosen()
    main([*args, "--output_dir", str(runs), *change])
    if chosen() != before:
        expected = expected | {"predictions"}
    assert stages_run(capsys.readouterr().out) == expected, name


def test_the_stale_case_refits_with_the_new_rule_and_methods(finished, tmp_path, capsys):
    """The issue's reproduction: another pairing rule and fewer methods on a finished run."""
    args, root = finished
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    before = load_report(runs / "default" / "report" / "report.json")
    assert before.meta["pairing"]["rule"] == "highest"
    capsys.readouterr()
    main(
        [
            *args,
            "--output_dir",
            str(runs),
            "--model.pairing.rule",
            "depth",
            "--model.vectors.methods",
            "[expertsteer]",
            "--skip",
            "predict",
        ]
    )
    out = capsys.readouterr().out
    assert "model.pairing.rule: 'highest' -> 'depth'" in out and "fitting again" in out
    assert "fit already complete" not in out and "report already made" not in out
    after = load_report(runs / "default" / "report" / "report.json")
    assert after.meta["pairing"]["rule"] == "depth"
    assert [m.method for m in after.datasets[0].methods if m.method != "none"] == ["expertsteer"]
    assert list((runs / "default" / "superseded").glob("last-*.ckpt"))  # the old fit is kept aside, not deleted


def test_fit_refuses_to_resume_a_checkpoint_of_other_options_in_one_message(finished, tmp_path, capsys):
    from es_lightning.cli import main as cli_main

    args, root = finished
    runs = tmp_path / "runs"
    shutil.copytree(root / "runs", runs)
    fit_args = [a for a in args if a != "--prompts" and not a.endswith("prompts.jsonl")]
    fit = ["fit", *fit_args, "--output_dir", str(runs), "--ckpt_path", "last", "--model.ridge", "0.5"]
    with pytest.raises(SystemExit) as ended:
        cli_main(fit)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "Traceback" not in err
    assert "es-lightning: error: " in err and "fitted with other options (model.ridge: None -> 0.5)" in err
    with pytest.raises(
        ValueError, match=r"fitted with other options"
    ):  # --verbose: the error itself, traceback and all
        cli_main(["--verbose", *fit])


def test_other_weights_under_the_same_model_name_are_refused_by_test_and_refitted_by_the_pipeline(
    tmp_path, tiny_gpt2_dir, tiny_llama_dir, capsys
):
    """A fit is keyed on its models' weights, not only on their names: an overwritten model folder."""
    from safetensors.torch import load_file, save_file

    from es_lightning.cli import main as cli_main

    expert = tmp_path / "expert"
    shutil.copytree(tiny_gpt2_dir, expert)
    args, _ = tiny_job(tmp_path, expert, tiny_llama_dir)
    args += ["--output_dir", str(tmp_path / "runs"), "--skip", "predict"]
    main(args)
    weights = next(expert.glob("*.safetensors"))
    state = load_file(weights)
    save_file({name: tensor * 1.5 for name, tensor in state.items()}, weights, metadata={"format": "pt"})
    capsys.readouterr()
    ckpt = tmp_path / "runs" / "default" / "last.ckpt"
    test_args = [a for a in args[: args.index("--skip")] if a != "--prompts" and not a.endswith("prompts.jsonl")]
    with pytest.raises(SystemExit) as ended:
        cli_main(["test", *test_args, "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err
    assert ended.value.code == 2 and "trained on a different paired cache (other models or weights" in err
    then, now = re.findall(r"expert \S+ \(weights (\w+)\)", err)  # the checkpoint's, then this run's
    assert then != now
    main(args)
    out = capsys.readouterr().out
    assert "data.expert: the weights of" in out and "fitting again" in out and stages_run(out) >= {"fit", "report"}
