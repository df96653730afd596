"""`es-lightning test`: the cross-validated evaluation end to end on tiny models."""

import json
from pathlib import Path

import pytest
import torch
from conftest import write_two_choice_jsonl

from es_lightning.cli import build_cli
from es_lightning.evaluation import protocol
from es_lightning.evaluation.report import load_report
from es_lightning.io import sha256_file
from es_lightning.steering.bundle import SteeringBundle

CONF = Path(__file__).parent / "conf" / "tiny.yaml"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir):
    tmp = tmp_path_factory.mktemp("eval")
    data = write_two_choice_jsonl(tmp / "two.jsonl", 30)
    args = [
        "--config",
        str(CONF),
        "--data.expert.name",
        str(tiny_gpt2_dir),
        "--data.target.name",
        str(tiny_llama_dir),
        "--data.data.path",
        str(data),
        "--data.cache_dir",
        str(tmp / "cache"),
        "--output_dir",
        str(tmp / "runs"),
    ]
    build_cli(["fit", *args])
    return tmp, args


def test_cross_validated_report(fitted, monkeypatch):
    tmp, args = fitted
    seen_rows = []
    real = protocol.compute_vector_set

    def spy(methods, pairs, inputs):
        seen_rows.extend((method, inputs.labels.shape[0]) for method in methods)
        return real(methods, pairs, inputs)

    monkeypatch.setattr(protocol, "compute_vector_set", spy)
    build_cli(["test", *args, "--ckpt_path", str(tmp / "runs" / "default" / "last.ckpt")])
    folder = tmp / "runs" / "default" / "report"
    report = load_report(folder / "report.json")
    dataset = report.datasets[0]
    assert report.k == 3 and dataset.n_questions == 30  # every question tested exactly once
    methods = {m.method: m for m in dataset.methods}
    assert list(methods) == ["none", "expertsteer", "rfm_self", "mean_difference", "random"]
    for name in ("expertsteer", "rfm_self", "mean_difference"):
        entry = methods[name]
        # constrained: a grid coefficient, or 0 exactly where no coefficient was within the damage budget
        assert all(c in (-0.5, 0.5) if f.within_budget else c == 0 for c, f in zip(entry.coefficients, entry.folds))
        assert all(c in (-0.5, 0.5) for c in entry.unconstrained.coefficients)
        for result in (entry, entry.unconstrained):
            assert (
                result.vs_none is not None
                and result.vs_random is not None
                and result.verdict in ("gain", "no gain", "worse")
            )
            assert result.vs_none.wins + result.vs_none.losses + result.vs_none.ties == 30
        generation = entry.generation
        assert generation.metrics == ("bleu_acc", "rouge_l_acc") and generation.verdict in ("gain", "no gain", "worse")
        assert (
            generation.vs_none["bleu_acc"].wins
            + generation.vs_none["bleu_acc"].losses
            + generation.vs_none["bleu_acc"].ties
            == 30
        )
        assert len(generation.vs_random["bleu_acc"].draw_accuracies) == 2
        assert entry.unconstrained.generation.vs_random is None  # draws are generated at the constrained coefficient
        kl = dict(zip(entry.sweep.coefficients, entry.sweep.mean_damage["kl"]))
        assert abs(kl[0.0]) < 1e-6 and all(value > 1e-4 for c, value in kl.items() if c != 0)  # measured, not assumed
    assert methods["none"].generation.vs_none is None and abs(methods["none"].generation.kl) < 1e-6
    assert sum(f.n_test for f in methods["none"].folds) == 30
    # vectors come from each fold's train questions only: 2 rows per question, 30 questions, 3 folds
    plans = json.loads((folder / "report.json").read_text())["meta"]["fold_plans"]
    for plan in plans:
        assert plan["n_train"] + plan["n_val"] + plan["n_test"] == 30
    assert sorted({rows for _, rows in seen_rows}) == sorted({2 * p["n_train"] for p in plans})
    markdown = (folder / "report.md").read_text()
    assert markdown.count("| two |") == 5
    for column in (
        "MC accuracy",
        "Generation accuracy",
        "KL",
        "CE increase",
        "Empty",
        "(constrained / unconstrained)",
        "Generation verdict",
        "Multiple choice at the unconstrained coefficient",
        "bleu_acc (p vs none",
    ):
        assert column in markdown
    bundles = load_report(folder / "report.json").meta["bundles"]  # the report names the bundle files it evaluated
    for method in ("expertsteer", "rfm_self", "mean_difference"):
        path = tmp / "runs" / "default" / "bundles" / f"{method}.safetensors"
        assert bundles[method] == sha256_file(path)
        assert "chosen_coefficient" not in SteeringBundle.load(path).extra  # test writes nothing into the bundles
    assert (folder / "coefficient_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluation_on_the_datamodule_split(fitted):
    tmp, args = fitted
    out = tmp / "split-report"
    build_cli(
        [
            "test",
            *args,
            "--model.evaluation.folds",
            "null",
            "--model.report_dir",
            str(out),
            "--ckpt_path",
            str(tmp / "runs" / "default" / "last.ckpt"),
        ]
    )
    report = load_report(out / "report.json")
    assert report.fold_mode == "split" and report.k == 1
    assert report.datasets[0].n_questions == 4  # 15% of 30 questions, rounded


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--model.evaluation.coefficients", "[]", "evaluation.coefficients is empty"),
        ("--model.evaluation.random_draws", "0", "random_draws must be an integer >= 1"),
        ("--model.pairing.top_k", "7", "top_k=7 but only 2 distinct pairs"),
        ("--model.pairing.mi_options", "{n_components: 40}", "held-out rows"),
        ("--model.pairing.mi_options", "{k: 5}", r"model.pairing.mi_options for mi_method 'gaussian': Unknown"),
        ("--model.evaluation.generation.metrics", "[bleu_acc, letter_match]", "letter_match changes the prompt"),
        (
            "--model.evaluation.generation.metrics",
            "[number_match]",
            "correct choice without a number, which number_match needs",
        ),
        ("--model.evaluation.budget.max_kl", "-1", "budget.max_kl must be a finite number >= 0"),
    ],
)
def test_bad_evaluation_settings_fail_before_any_model_is_loaded(fitted, monkeypatch, option, value, message):
    tmp, args = fitted
    from es_lightning import module

    monkeypatch.setattr(
        module, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the settings were checked")
    )
    with pytest.raises(ValueError, match=message):
        build_cli(["test", *args, option, value, "--ckpt_path", str(tmp / "runs" / "default" / "last.ckpt")])


def test_fit_with_too_few_held_out_rows_for_the_pair_search_fails_before_any_model_is_loaded(
    fitted, tmp_path, monkeypatch
):
    _, args = fitted
    from es_lightning.models import loading

    def refuse(*a, **k):
        pytest.fail("a model was loaded before the pair search's rows were checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    for name in ("es_lightning.data.datamodule", "es_lightning.module"):
        monkeypatch.setattr(f"{name}.load_model", refuse, raising=False)
    fresh = [*args, "--data.cache_dir", str(tmp_path / "empty-cache"), "--output_dir", str(tmp_path / "runs")]
    # 30 questions x 2 rows: the 15% val split holds 8 rows, fewer than 40 Gaussian-MI components need
    with pytest.raises(ValueError, match="Layer-pair search during fit .* 8 held-out rows.*needs at least"):
        build_cli(["fit", *fresh, "--model.pairing.mi_options", "{n_components: 40}"])
    assert not (tmp_path / "empty-cache" / "paired").exists()  # nothing extracted


def test_unknown_generation_metric_is_refused_by_the_parser_with_the_choices(fitted, capsys):
    tmp, args = fitted
    with pytest.raises(SystemExit):
        build_cli(
            [
                "test",
                *args,
                "--model.evaluation.generation.metrics",
                "[bleu]",
                "--ckpt_path",
                str(tmp / "runs" / "default" / "last.ckpt"),
            ]
        )
    assert "bleu_acc" in capsys.readouterr().err


def test_fewer_random_draws_answer_in_generation_than_in_multiple_choice(fitted, tmp_path):
    tmp, args = fitted
    build_cli(
        [
            "test",
            *args,
            "--model.evaluation.generation.random_draws",
            "1",
            "--model.report_dir",
            str(tmp_path),
            "--ckpt_path",
            str(tmp / "runs" / "default" / "last.ckpt"),
        ]
    )
    for entry in load_report(tmp_path).datasets[0].methods[1:4]:
        assert len(entry.vs_random.draw_accuracies) == 2
        assert len(entry.generation.vs_random["bleu_acc"].draw_accuracies) == 1


def test_a_budget_that_excludes_every_coefficient_is_reported_and_predict_skips_the_methods(fitted, tmp_path, caplog):
    tmp, args = fitted
    out = tmp_path / "report"
    ckpt = ["--ckpt_path", str(tmp / "runs" / "default" / "last.ckpt")]
    build_cli(["test", *args, "--model.evaluation.budget.max_kl", "0", "--model.report_dir", str(out), *ckpt])
    report = load_report(out)
    for entry in report.datasets[0].methods[1:]:
        assert entry.coefficients == (0.0, 0.0, 0.0) and not any(f.within_budget for f in entry.folds)
        assert all(c in (-0.5, 0.5) for c in entry.unconstrained.coefficients)  # still computed and reported
    assert (out / "report.md").read_text().count("no coefficient within budget") >= 3
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    cli = build_cli(["predict", *args, "--model.report_dir", str(out), "--data.predict_data.path", str(prompts), *ckpt])
    writer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SteeredPredictionWriter")
    rows = [json.loads(line) for line in Path(writer.output_path).read_text().splitlines()]
    assert rows and {row["method"] for row in rows} == {"none"}
    assert "no coefficient of expertsteer within the damage budget" in caplog.text


def test_unknown_pairing_rule_is_refused_by_the_parser_with_the_choices(fitted, capsys):
    tmp, args = fitted
    with pytest.raises(SystemExit):
        build_cli(
            [
                "test",
                *args,
                "--model.pairing.rule",
                "median",
                "--ckpt_path",
                str(tmp / "runs" / "default" / "last.ckpt"),
            ]
        )
    assert "'highest', 'lowest', 'separability', 'depth'" in capsys.readouterr().err


def test_checkpoint_without_pairs_is_refused(fitted, tmp_path):
    tmp, args = fitted
    ckpt = torch.load(tmp / "runs" / "default" / "last.ckpt", weights_only=False)
    ckpt["es_lightning"].pop("pairing")
    torch.save(ckpt, tmp_path / "bare.ckpt")
    with pytest.raises(ValueError, match="no layer pairs or vectors"):
        build_cli(["test", *args, "--ckpt_path", str(tmp_path / "bare.ckpt")])


def write_prompts(path, n, field="prompt"):
    path.write_text(
        "".join(
            json.dumps({"id": f"p{i}", field: f"what is the {w} ?"}) + "\n"
            for i, w in zip(range(n), ["cat", "dog", "sun", "moon", "tree", "fish", "bird"] * 9)
        )
    )
    return path


def test_predict_writes_one_file_in_input_order(fitted, tmp_path):
    tmp, args = fitted
    prompts = write_prompts(tmp_path / "prompts.jsonl", 7)
    cli = build_cli(
        [
            "predict",
            *args,
            "--data.predict_data.path",
            str(prompts),
            "--ckpt_path",
            str(tmp / "runs" / "default" / "last.ckpt"),
        ]
    )
    path = cli.trainer.callbacks[
        [type(c).__name__ for c in cli.trainer.callbacks].index("SteeredPredictionWriter")
    ].output_path
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(7) for _ in range(3)]
    assert [(r["method"], r["coefficient"]) for r in rows[:3]] == [
        ("none", 0.0),
        ("expertsteer", 0.5),
        ("mean_difference", 0.5),
    ]
    assert all(set(r) >= {"id", "prompt", "output", "method", "coefficient"} for r in rows)


def test_predict_bad_input(fitted, tmp_path):
    tmp, args = fitted
    ckpt = str(tmp / "runs" / "default" / "last.ckpt")
    wrong_field = write_prompts(tmp_path / "wrong.jsonl", 3, field="text")
    with pytest.raises(KeyError, match="prompt"):
        build_cli(["predict", *args, "--data.predict_data.path", str(wrong_field), "--ckpt_path", ckpt])
    prompts = write_prompts(tmp_path / "prompts.jsonl", 2)
    with pytest.raises(ValueError, match="predict.coefficients is empty"):
        build_cli(
            [
                "predict",
                *args,
                "--data.predict_data.path",
                str(prompts),
                "--model.predict.coefficients",
                "[]",
                "--ckpt_path",
                ckpt,
            ]
        )
    # a bundle made for another target model
    from es_lightning.steering import ModelIdentity, SteeringBundle

    other = SteeringBundle(
        "expertsteer", {1: torch.ones(32) / 32**0.5}, {1: 1.0}, ModelIdentity("other-model", "0123456789abcdef")
    )
    other.save(tmp_path / "bundles" / "expertsteer.safetensors")
    with pytest.raises(ValueError, match="other-model"):
        build_cli(
            [
                "predict",
                *args,
                "--data.predict_data.path",
                str(prompts),
                "--model.predict.methods",
                "[expertsteer]",
                "--model.predict.bundle_dir",
                str(tmp_path / "bundles"),
                "--ckpt_path",
                ckpt,
            ]
        )


def test_predict_again_with_the_same_configuration_reuses_the_rows(fitted, tmp_path, monkeypatch):
    tmp, args = fitted
    prompts = write_prompts(tmp_path / "prompts.jsonl", 3)
    out = tmp_path / "out"
    command = [
        "predict",
        *args,
        "--data.predict_data.path",
        str(prompts),
        "--trainer.callbacks.output_dir",
        str(out),
        "--ckpt_path",
        str(tmp / "runs" / "default" / "last.ckpt"),
    ]
    build_cli(command)
    first = (out / "predictions.jsonl").read_bytes()
    from es_lightning import prediction

    calls = []
    monkeypatch.setattr(
        prediction, "generate", lambda model, tok, texts, *a, **k: calls.append(1) or ["x"] * len(texts)
    )
    build_cli(command)
    assert calls == [] and (out / "predictions.jsonl").read_bytes() == first
    build_cli([*command[:-2], "--model.predict.coefficients", "[0.25]", *command[-2:]])  # another configuration
    assert calls  # regenerated
