"""Exceptions raised by :mod:`minference_patterns`."""

from __future__ import annotations

__all__ = ["ConfigError", "UnknownModelError"]


class ConfigError(ValueError):
    """A pattern config (a file, a dict or the arguments of an object) is malformed.

    ``source`` names the file (or object) that was read, ``location`` the place inside it, e.g.
    ``"layer 3, head 7, field 'num_vertical'"``. Both are part of the message.
    """

    def __init__(self, message: str, *, source: str | None = None, location: str | None = None):
        self.source = source
        self.location = location
        self.reason = message
        parts = [p for p in (source, location) if p]
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)


class UnknownModelError(KeyError, ValueError):
    """No shipped pattern config matches a model id (catch it as ``KeyError`` or ``ValueError``)."""

    def __init__(self, message: str, model_id: str):
        super().__init__(message)
        self.model_id = model_id
        self.message = message

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return self.message
