"""glm-serve: a local inference server for the open GLM-4 weights."""

__version__ = "0.1.0"
