"""The 3D convolutional VAE detector: model (``module``), data (``data``) and the wrapper (``detector``)."""

from .detector import CVAEDetector

__all__ = ["CVAEDetector"]
