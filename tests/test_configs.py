"""Every shipped YAML parses and instantiates, so configs never go stale."""

from pathlib import Path

import pytest
import torch
import yaml

from es_lightning.module import ExpertSteer
from es_lightning.cli import ESLightningCLI
from es_lightning.data import PairedHiddenStatesDataModule

ROOT = Path(__file__).resolve().parents[1]
LMEVAL = sorted((ROOT / "configs" / "lmeval").glob("*.yaml"))  # lm-eval task files, not es-lightning configs
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - set(LMEVAL)) + sorted((ROOT / "tests" / "conf").rglob("*.yaml"))
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
# Configs that ask for GPUs are instantiated on CPU where none is visible (the GPU request itself is checked below).
ON_CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]


def wants_gpu(path: Path) -> bool:
    return (yaml.safe_load(path.read_text()).get("trainer") or {}).get("accelerator") == "gpu"


def test_configs_exist():
    assert any(p.name == "default.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", LMEVAL, ids=lambda p: str(p.relative_to(ROOT)))
def test_lmeval_task_files_load_with_lmeval(path):
    from lm_eval.tasks._yaml_loader import load_yaml

    task = load_yaml(path)
    assert task["output_type"] == "multiple_choice" and callable(task["custom_dataset"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_instantiates(path, tmp_path):
    cli = ESLightningCLI(
        ExpertSteer, PairedHiddenStatesDataModule, run=False,
        args=["--config", str(path), "--output_dir", str(tmp_path),
              *(ON_CPU if wants_gpu(path) and not torch.cuda.is_available() else [])],
        auto_configure_optimizers=False,
    )
    assert isinstance(cli.model, ExpertSteer)
    assert isinstance(cli.datamodule, PairedHiddenStatesDataModule)
    assert cli.datamodule.expert_spec.name and cli.datamodule.target_spec.name


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        ESLightningCLI(ExpertSteer, PairedHiddenStatesDataModule, run=False,
                       args=["--config", str(CONFIGS[0]), "--model.no_such_option", "1"], auto_configure_optimizers=False)


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
        ESLightningCLI(ExpertSteer, PairedHiddenStatesDataModule, run=False,
                       args=["--config", str(CONFIGS[0]), *override], auto_configure_optimizers=False)
    text = str(error.value) + capsys.readouterr().err
    assert message in text


def test_paper_configs_ask_for_every_gpu_with_ddp_in_bfloat16_on_existing_data():
    assert len(PAPER) >= 3
    for path in PAPER:
        config = yaml.safe_load(path.read_text())
        assert config["trainer"]["accelerator"] == "gpu" and config["trainer"]["devices"] == "auto", path.name
        assert config["trainer"]["strategy"] == "ddp", path.name
        data = config["data"]
        assert data["expert"]["dtype"] == data["target"]["dtype"] == config["model"]["target_dtype"] == "bfloat16", path.name
        assert "/" in data["expert"]["name"] and "/" in data["target"]["name"], path.name  # Hub ids
        text = path.read_text()
        assert "Expected memory per stage" in text and "Expected time per stage: not measured" in text, path.name
        if (ROOT.parent / "shared" / "data").is_dir():  # paths are relative to the checkout, as in every shipped config
            assert (ROOT / data["data"]["path"]).is_file(), data["data"]["path"]
        assert (ROOT / data["predict_data"]["path"]).is_file(), data["predict_data"]["path"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_paper_config_without_a_gpu_is_refused_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match="--trainer.accelerator cpu"):
        ESLightningCLI(ExpertSteer, PairedHiddenStatesDataModule, run=False,
                       args=["--config", str(PAPER[0]), "--output_dir", str(tmp_path)], auto_configure_optimizers=False)
