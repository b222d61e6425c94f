"""recloop: large sequential recommendation models, from logs to real-time serving."""

__version__ = "0.1.0"
