"""The lm-eval export, proven on lm-evaluation-harness itself: its ``steered`` model on a local multiple-choice task
gives the per-choice log-likelihoods of es-lightning's own scoring, steered and unsteered."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_mc_jsonl

from es_lightning.evaluation.report import DatasetReport, FoldResult, Report, method_result
from es_lightning.evaluation.report_markdown import write_report
from es_lightning.evaluation.scoring import score_choices
from es_lightning.export.cli import main as export_main
from es_lightning.export.lmeval import hookpoints
from es_lightning.export.source import load_source, steering_deltas
from es_lightning.io import sha256_file
from es_lightning.models import load_model
from es_lightning.steering.bundle import ModelIdentity, SteeringBundle
from es_lightning.steering.hooks import _deltas, steer

TASK = "es_export_local_mc"
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
"""


def lm_eval_loglikelihoods(tmp_path, model_dir, n_questions: int, steer_path=None) -> dict[int, list[float]]:
    """lm-eval's per-choice log-likelihoods (``hf`` model, or ``steered`` with ``steer_path``) per doc id."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task_dir = tmp_path / "tasks"
    task_dir.mkdir(parents=True, exist_ok=True)
    data = write_mc_jsonl(tmp_path / "mc.jsonl", n_questions=n_questions)
    (task_dir / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    model_args = {"pretrained": str(model_dir), "dtype": "float32", "device": "cpu"}
    if steer_path is not None:
        model_args["steer_path"] = str(steer_path)
    results = simple_evaluate(
        model="steered" if steer_path is not None else "hf",
        model_args=model_args,
        tasks=[TASK],
        batch_size=8,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        cache_requests=False,
    )
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in results["samples"][TASK]}


def our_loglikelihoods(model, tokenizer, path, context=None) -> dict[int, list[float]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    scores = score_choices(
        model,
        tokenizer,
        [r["question"] for r in rows],
        [[" " + c for c in r["choices"]] for r in rows],
        context=context,
        batch_size=8,
        progress=False,
    )
    return {i: list(s.logprob_sum) for i, s in enumerate(scores)}


def assert_same(theirs: dict, ours: dict, atol: float) -> None:
    assert sorted(theirs) == sorted(ours)
    for doc in ours:
        torch.testing.assert_close(torch.tensor(theirs[doc]), torch.tensor(ours[doc]), atol=atol, rtol=1e-4)


def max_shift(a: dict, b: dict) -> float:
    return max(abs(x - y) for doc in a for x, y in zip(a[doc], b[doc]))


def make_run(folder, loaded, layers: dict[int, float], seed: int = 0, method: str = "expertsteer"):
    """A run folder whose ``bundles/<method>.safetensors`` holds random unit vectors for ``loaded``."""
    generator = torch.Generator().manual_seed(seed)
    width = loaded.model.config.hidden_size
    bundle = SteeringBundle.from_directions(
        method,
        {layer: torch.randn(width, generator=generator) for layer in layers},
        layers,
        ModelIdentity.of(loaded),
    )
    bundle.save(folder / "bundles" / f"{method}.safetensors")
    return bundle


def write_run_report(run, chosen: dict[str, list[float | None]], bundles: dict[str, object]):
    """``<run>/report/report.json`` as ``es-lightning test`` writes it: each method's coefficient chosen in each fold,
    with the sha256 of the bundle files (``{method: path}``) it was made from."""
    folds = {
        method: [FoldResult(fold, c, 0.5, 0.5, 10) for fold, c in enumerate(values)]
        for method, values in chosen.items()
    }
    report = Report(
        model="tiny",
        scoring="mean",
        alpha=0.05,
        k=3,
        fold_mode="random",
        datasets=(DatasetReport("mc", 30, tuple(method_result(m, f) for m, f in folds.items())),),
        meta={"bundles": {method: sha256_file(path) for method, path in bundles.items()}},
    )
    return write_report(report, run / "report")[0]


def test_lm_eval_steered_equals_es_lightning_scoring(tmp_path, tiny_llama_dir, offline):
    loaded = load_model(str(tiny_llama_dir))
    bundle = make_run(tmp_path / "run", loaded, {1: 4.0, 3: 6.0})
    steer_file = tmp_path / "expertsteer.pt"
    assert (
        export_main(
            ["lm-eval", str(tmp_path / "run"), "--method", "expertsteer", "--coefficient", "0.5", "-o", str(steer_file)]
        )
        == 0
    )
    config = torch.load(steer_file, weights_only=True)  # plain tensors, floats and None only
    assert sorted(config) == ["layers.1", "layers.3"]
    assert config["layers.1"]["action"] == "add" and config["layers.1"]["bias"] is None
    assert config["layers.1"]["head_index"] is None

    n = 12
    theirs_plain = lm_eval_loglikelihoods(tmp_path / "plain", tiny_llama_dir, n)
    theirs_steered = lm_eval_loglikelihoods(tmp_path / "steered", tiny_llama_dir, n, steer_file)
    data = write_mc_jsonl(tmp_path / "mc.jsonl", n_questions=n)
    ours_plain = our_loglikelihoods(loaded.model, loaded.tokenizer, data)
    ours_steered = our_loglikelihoods(
        loaded.model, loaded.tokenizer, data, context=lambda: steer(loaded.model, **bundle.steering_kwargs(0.5))
    )
    assert max_shift(ours_plain, ours_steered) > 0.05  # steering moves the scores, so the comparison means something
    assert_same(theirs_plain, ours_plain, atol=1e-4)
    assert_same(theirs_steered, ours_steered, atol=1e-4)


def test_exported_vectors_are_what_the_hooks_add(tiny_llama_dir, tiny_gpt2_dir, tmp_path):
    loaded = load_model(str(tiny_llama_dir))
    bundle = make_run(tmp_path / "run", loaded, {0: 2.5, 2: 3.5})
    ours = steering_deltas(bundle, 0.37)
    theirs = _deltas(loaded.model, bundle.vectors, 0.37, bundle.norms, 4)
    assert all(torch.equal(ours[layer], theirs[layer]) for layer in ours)
    assert hookpoints(tiny_llama_dir, [0, 3])[0] == {0: "layers.0", 3: "layers.3"}
    assert hookpoints(tiny_gpt2_dir, [0, 2])[0] == {0: "h.0", 2: "h.2"}


def test_bad_input_is_refused_and_nothing_is_written(tmp_path, tiny_llama_dir, tiny_gpt2_dir, capsys):
    loaded = load_model(str(tiny_llama_dir))
    make_run(tmp_path / "run", loaded, {1: 4.0})
    run, out = str(tmp_path / "run"), tmp_path / "out.pt"

    def refused(args, message):
        assert export_main(args) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(".out.pt.*"))

    refused(
        ["lm-eval", run, "--method", "rfm_self", "--coefficient", "0.2", "-o", str(out)],
        "The run has no 'rfm_self' bundle",
    )
    refused(["lm-eval", run, "--method", "expertsteer", "--coefficient", "nan", "-o", str(out)], "finite number")
    refused(["lm-eval", run, "--method", "expertsteer", "--coefficient", "inf", "-o", str(out)], "finite number")
    refused(["lm-eval", run, "--method", "expertsteer", "-o", str(out)], "No coefficient given")
    refused(
        [
            "lm-eval",
            run,
            "--method",
            "expertsteer",
            "--coefficient",
            "0.2",
            "--model",
            str(tiny_gpt2_dir),
            "-o",
            str(out),
        ],
        "Steering vectors do not transfer between models",
    )
    refused(
        ["lm-eval", run, "--method", "expertsteer", "--coefficient", "0.2", "-o", str(tmp_path / "out.txt")],
        "ending in .pt or .pth",
    )
    out.write_bytes(b"keep me")
    assert export_main(["lm-eval", run, "--method", "expertsteer", "--coefficient", "0.2", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"


def test_coefficient_defaults_to_the_reports_choice(tmp_path, tiny_llama_dir, capsys):
    """Without --coefficient: the median of the folds' choices, from a report made from this very bundle file."""
    loaded = load_model(str(tiny_llama_dir))
    run = tmp_path / "run"
    bundle = make_run(run, loaded, {1: 4.0, 3: 6.0})
    make_run(run, loaded, {2: 5.0}, seed=3, method="rfm_self")
    path, rfm_path = run / "bundles" / "expertsteer.safetensors", run / "bundles" / "rfm_self.safetensors"
    report = write_run_report(
        run,
        {"none": [None, None, None], "expertsteer": [0.4, -0.1, -0.2], "random": [0.8] * 3},
        {"expertsteer": path, "rfm_self": rfm_path},
    )
    source = load_source(run, "expertsteer")
    assert source.coefficient == -0.1 and source.coefficient_origin == f"report {report}"
    assert load_source(path).coefficient == -0.1  # a bundle file inside a run: that run's report
    elsewhere = tmp_path / "copy" / "expertsteer.safetensors"  # the same bytes anywhere, with the report named
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(path.read_bytes())
    assert load_source(elsewhere, report=run / "report").coefficient == -0.1
    out = tmp_path / "steer.pt"
    assert export_main(["lm-eval", str(run), "--method", "expertsteer", "-o", str(out)]) == 0
    exported = torch.load(out, weights_only=True)
    for layer, delta in steering_deltas(bundle, -0.1).items():  # written at the report's coefficient
        assert torch.equal(exported[f"layers.{layer}"]["steering_vector"], delta)
    with pytest.raises(ValueError, match="chose no coefficient for 'rfm_self'"):
        load_source(run, "rfm_self")
    write_run_report(run, {"expertsteer": [0.0, 0.0, 0.3]}, {"expertsteer": path})
    with pytest.raises(ValueError, match="found no coefficient of 'expertsteer' within the damage budget"):
        load_source(run, "expertsteer")
    make_run(run, loaded, {1: 4.0, 3: 6.0}, seed=1)  # the bundle is recomputed: the report is of the old one
    with pytest.raises(ValueError, match="was not made from this expertsteer bundle"):
        load_source(run, "expertsteer")
    assert export_main(["lm-eval", str(run), "--method", "expertsteer", "-o", str(tmp_path / "stale.pt")]) == 2
    assert "pass --coefficient" in capsys.readouterr().err and not (tmp_path / "stale.pt").exists()


@pytest.mark.slow
def test_lm_eval_steered_equals_es_lightning_scoring_on_smollm2(tmp_path, offline):
    loaded = load_model("smollm2-135m-instruct")
    bundle = make_run(tmp_path / "run", loaded, {12: 140.0, 15: 170.0, 17: 190.0})  # measured mean norms
    steer_file = tmp_path / "expertsteer.pt"
    assert (
        export_main(
            ["lm-eval", str(tmp_path / "run"), "--method", "expertsteer", "--coefficient", "0.3", "-o", str(steer_file)]
        )
        == 0
    )
    n = 4
    theirs_plain = lm_eval_loglikelihoods(tmp_path / "plain", loaded.directory, n)
    theirs_steered = lm_eval_loglikelihoods(tmp_path / "steered", loaded.directory, n, steer_file)
    data = write_mc_jsonl(tmp_path / "mc.jsonl", n_questions=n)
    ours_plain = our_loglikelihoods(loaded.model, loaded.tokenizer, data)
    ours_steered = our_loglikelihoods(
        loaded.model, loaded.tokenizer, data, context=lambda: steer(loaded.model, **bundle.steering_kwargs(0.3))
    )
    assert max_shift(ours_plain, ours_steered) > 0.5
    assert_same(theirs_plain, ours_plain, atol=2e-3)
    assert_same(theirs_steered, ours_steered, atol=2e-3)


def test_an_unreadable_report_is_a_clear_error(tmp_path, tiny_llama_dir):
    make_run(tmp_path / "run", load_model(str(tiny_llama_dir)), {1: 4.0})
    (tmp_path / "run" / "report").mkdir()
    (tmp_path / "run" / "report" / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="Cannot read the evaluation report"):
        load_source(tmp_path / "run", "expertsteer")
