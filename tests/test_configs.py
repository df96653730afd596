"""Every shipped YAML parses and instantiates, so configs never go stale."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_mc_jsonl

from es_lightning.cli import ESLightningCLI
from es_lightning.data import PairedHiddenStatesDataModule
from es_lightning.data.question_table import read_source
from es_lightning.module import ExpertSteer

ROOT = Path(__file__).resolve().parents[1]
TINY_CONF = ROOT / "tests" / "conf" / "tiny.yaml"
LMEVAL = sorted((ROOT / "configs" / "lmeval").glob("*.yaml"))  # lm-eval task files, not es-lightning configs
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - set(LMEVAL)) + sorted(
    (ROOT / "tests" / "conf").rglob("*.yaml")
)
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
# Configs that ask for GPUs are instantiated on CPU where none is visible (the GPU request itself is checked below).
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


def wants_gpu(path: Path) -> bool:
    return (yaml.safe_load(path.read_text()).get("trainer") or {}).get("accelerator") == "gpu"


def test_configs_are_found_and_told_apart_from_lmeval_task_files():
    """The parametrised tests below run on every config: none is missed, none is an lm-eval task file."""
    names = {str(p.relative_to(ROOT)) for p in CONFIGS}
    assert {"configs/default.yaml", "configs/gsm8k_mc.yaml", "configs/pubmedqa.yaml", "tests/conf/tiny.yaml"} <= names
    assert len(PAPER) >= 3 and set(PAPER) <= set(CONFIGS)

    def read(path: Path) -> dict:  # lm-eval's "!function" tag read as a plain string
        return yaml.safe_load(path.read_text().replace("!function ", ""))

    for path in CONFIGS:
        assert {"model", "data", "trainer"} <= set(read(path)) and "task" not in read(path), path
    assert LMEVAL and all("task" in read(path) for path in LMEVAL)


@pytest.mark.parametrize("path", LMEVAL, ids=lambda p: str(p.relative_to(ROOT)))
def test_lmeval_task_files_load_with_lmeval(path, tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    task = load_yaml(path)
    assert task["output_type"] == "multiple_choice"
    data = write_mc_jsonl(tmp_path / "mc.jsonl", n_questions=20)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert task["custom_dataset"](data_files=str(data))["test"].to_list() == rows  # split "all": every row, in order
    splits = {
        split: [row["id"] for row in task["custom_dataset"](data_files=str(data), split=split)["test"]]
        for split in ("train", "val", "test")
    }
    assert sorted(sum(splits.values(), [])) == sorted(row["id"] for row in rows) and all(splits.values())


# A few rows of each ../shared/data file the configs read, in that file's own shape (../shared/data/README.md).
SHARED_ROWS = {
    "truthfulqa_mc.jsonl": [
        {"id": "truthfulqa-0", "question": "Is the sky green?", "choices": ["Yes.", "No, it is blue."], "answer": 1},
        {"id": "truthfulqa-1", "question": "Do fish fly?", "choices": ["Most do not.", "All do.", "No."], "answer": 0},
    ],
    "pubmedqa_pqal.jsonl": [
        {
            "id": "pubmedqa-1",
            "question": "Does X help?",
            "context": "X was given. It helped.",
            "choices": ["yes", "no", "maybe"],
            "answer": 0,
            "long_answer": "X helped.",
        },
        {
            "id": "pubmedqa-2",
            "question": "Does Y help?",
            "context": "Y was given.",
            "choices": ["yes", "no", "maybe"],
            "answer": 2,
            "long_answer": "Unclear.",
        },
    ],
    "gsm8k_train.jsonl": [
        {"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3-1=<<3-1=2>>2\n#### 2"},
        {"question": "What is 7 times 6?", "answer": "7*6=<<7*6=42>>42\n#### 42"},
    ],
}
# Config keys whose value the module or data module keeps under another attribute name.
RENAMED = {
    "layer_map": "declared_layer_map",
    "predict": "predict_config",
    "expert": "expert_spec",
    "target": "target_spec",
    "pair_weight": "alignment.pair_weight",
    "data": "source",
    "alignment_data": "alignment_source",
    "splits": "split_config",
    "predict_data": "predict_source",
}
FACTORIES = {"optimizer", "scheduler"}  # kept as factories, not as the values written


def plain(value):
    """``value`` with tuples as lists and paths as strings, to compare with what YAML gives."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, Path) else value


def assert_carries(obj, section: dict, where: str, renamed: dict[str, str] = RENAMED) -> None:
    """Every value the config writes in ``section`` is the value ``obj`` holds (nested sections: nested objects)."""
    for key, value in section.items():
        if key in FACTORIES:
            continue
        held = obj
        for name in renamed.get(key, key).split("."):  # a dotted rename: a value the object holds in a part
            held = getattr(held, name)
        if isinstance(value, dict) and not isinstance(held, dict):
            assert_carries(held, value, f"{where}.{key}", {})
        else:
            assert plain(held) == plain(value), f"{where}.{key}: the config says {value!r}, the object has {held!r}"


def correct_choice(row: dict) -> str:
    """The correct answer's text of a row of SHARED_ROWS (GSM8K: the number after ``####``)."""
    if isinstance(row["answer"], str):
        return row["answer"].rsplit("####", 1)[1].strip()
    return row["choices"][row["answer"]]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_instantiates(path, tmp_path, monkeypatch):
    cli = ESLightningCLI(
        ExpertSteer,
        PairedHiddenStatesDataModule,
        run=False,
        args=[
            "--config",
            str(path),
            "--output_dir",
            str(tmp_path),
            *(ON_CPU if wants_gpu(path) and not torch.cuda.is_available() else []),
        ],
        auto_configure_optimizers=False,
    )
    config = yaml.safe_load(path.read_text())
    assert_carries(cli.model, config["model"], "model")
    assert_carries(cli.datamodule, config["data"], "data")
    data_path = config["data"]["data"]["path"]
    if not data_path.startswith("../shared/data/"):
        assert path == TINY_CONF  # the tests fill in its data path
        return
    # read from a checkout whose ../shared/data holds a few rows in the real file's shape, as the fit would
    rows = SHARED_ROWS[Path(data_path).name]
    shared = tmp_path / "shared" / "data" / Path(data_path).name
    shared.parent.mkdir(parents=True)
    shared.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    _, questions = read_source(cli.datamodule.source, cli.datamodule.cache_dir)
    template = cli.datamodule.source.format.prompt_template
    assert [q.prompt for q in questions] == [template.format(**row) for row in rows]
    assert [q.choices[q.answer] for q in questions] == [correct_choice(row) for row in rows]


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        ESLightningCLI(
            ExpertSteer,
            PairedHiddenStatesDataModule,
            run=False,
            args=["--config", str(CONFIGS[0]), "--model.no_such_option", "1"],
            auto_configure_optimizers=False,
        )


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.pair_weight", "heavy"], "pair_weight"),  # wrong type
        (["--model.evaluation.coefficients", "[0.1, .nan]"], "finite"),
        (["--model.predict.coefficients", "[.inf]"], "finite"),
    ],
)
def test_wrong_types_and_nan_coefficients_are_refused(override, message, capsys):
    with pytest.raises((SystemExit, ValueError)) as error:
        ESLightningCLI(
            ExpertSteer,
            PairedHiddenStatesDataModule,
            run=False,
            args=["--config", str(CONFIGS[0]), *override],
            auto_configure_optimizers=False,
        )
    text = str(error.value) + capsys.readouterr().err
    assert message in text


def test_paper_configs_ask_for_every_gpu_with_ddp_in_bfloat16_on_the_shared_data():
    assert len(PAPER) >= 3
    for path in PAPER:
        config = yaml.safe_load(path.read_text())
        assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["devices"] == "auto", path.name
        assert config["trainer"]["strategy"] == "ddp", path.name
        data = config["data"]
        assert data["expert"]["dtype"] == data["target"]["dtype"] == config["model"]["target_dtype"] == "bfloat16", (
            path.name
        )
        assert "/" in data["expert"]["name"] and "/" in data["target"]["name"], path.name  # Hub ids
        text = path.read_text()
        assert "Expected memory per stage" in text and "Expected time per stage: not measured" in text, path.name
        # relative to the checkout, as in every shipped config (test_config_parses_and_instantiates reads it so)
        assert data["data"]["path"] == f"../shared/data/{Path(data['data']['path']).name}", path.name
        assert Path(data["data"]["path"]).name in SHARED_ROWS, path.name
        assert (ROOT / data["predict_data"]["path"]).is_file(), data["predict_data"]["path"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_paper_config_without_a_gpu_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="--trainer.accelerator cpu"):
        ESLightningCLI(
            ExpertSteer,
            PairedHiddenStatesDataModule,
            run=False,
            args=["--config", str(PAPER[0]), "--output_dir", str(tmp_path)],
            auto_configure_optimizers=False,
        )
