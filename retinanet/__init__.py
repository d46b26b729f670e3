"""RetinaNet: a readable, fast, hard-to-break single-stage detector in PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Detector"]


def __getattr__(name: str):
    # Lazy: `import retinanet.config` must not pull in torch, albumentations and pycocotools.
    if name == "Detector":
        from .detector import Detector
        return Detector
    raise AttributeError(name)
