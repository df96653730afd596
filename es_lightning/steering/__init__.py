"""ExpertSteer steps 2-4: MI layer pairing, RFM and baseline vectors, the bundle file format, steering hooks."""

from es_lightning.steering.bundle import ModelIdentity, SteeringBundle, save_bundles
from es_lightning.steering.hooks import steer

__all__ = ["ModelIdentity", "SteeringBundle", "save_bundles", "steer"]
