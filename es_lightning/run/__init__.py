"""The run's record: what each stage depends on (content keys deciding reuse) and the coefficients a run steers
with after ``test``."""

from es_lightning.run.coefficients import ChosenCoefficients, resolve_coefficients
from es_lightning.run.keys import STAGE_OPTIONS, changed_options, stage_key, stage_options

__all__ = [
    "STAGE_OPTIONS",
    "ChosenCoefficients",
    "changed_options",
    "resolve_coefficients",
    "stage_key",
    "stage_options",
]
