"""Step 1 of ExpertSteer: auto-encoders that carry expert states into the target's width (``maps.py``), and their
training around the paired cache (``fitting.py``)."""

from es_lightning.alignment.maps import AlignmentMaps

__all__ = ["AlignmentMaps"]
