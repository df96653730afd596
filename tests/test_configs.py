"""Every shipped YAML parses and instantiates, so configs never go stale."""

from pathlib import Path

import pytest

from es_lightning.module import ExpertSteer
from es_lightning.cli import ESLightningCLI
from es_lightning.data import PairedHiddenStatesDataModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "tests" / "conf").rglob("*.yaml"))


def test_configs_exist():
    assert any(p.name == "default.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_and_instantiates(path, tmp_path):
    cli = ESLightningCLI(
        ExpertSteer, PairedHiddenStatesDataModule, run=False,
        args=["--config", str(path), "--output_dir", str(tmp_path)], auto_configure_optimizers=False,
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
