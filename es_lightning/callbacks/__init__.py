"""Lightning callbacks that run ExpertSteer's steps 2 and 3 when fitting ends."""

from es_lightning.callbacks.pairing import LayerPairingCallback
from es_lightning.callbacks.prediction_writer import SteeredPredictionWriter
from es_lightning.callbacks.vectors import SteeringVectorCallback

__all__ = ["LayerPairingCallback", "SteeredPredictionWriter", "SteeringVectorCallback"]
