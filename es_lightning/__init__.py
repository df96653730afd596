"""es-lightning: ExpertSteer (arXiv 2505.12313) as a PyTorch Lightning workflow.

Layers of the package (lower never imports higher):
``io`` -> ``models`` -> ``data`` -> ``alignment`` -> ``steering`` -> ``callbacks`` -> ``evaluation`` -> ``module``
-> ``cli`` -> ``pipeline``.
"""

__version__ = "0.1.0"
