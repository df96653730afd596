"""Step 1 of ExpertSteer: auto-encoders that carry expert states into the target's width."""

from es_lightning.alignment.autoencoder import AlignmentAutoEncoder

__all__ = ["AlignmentAutoEncoder"]
