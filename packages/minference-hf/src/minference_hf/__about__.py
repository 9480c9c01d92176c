"""The version of minference-hf: the one place it is written (hatch reads it for the wheel)."""

__version__ = "0.2.0"
