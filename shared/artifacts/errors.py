"""The one exception type this package raises to its callers."""

from __future__ import annotations

__all__ = ["ArtifactError"]


class ArtifactError(ValueError):
    """An artifact, manifest or argument is invalid.

    Subclasses ``ValueError`` because every cause is bad input from a client rather than a server
    fault; services map it to ``INVALID_ARGUMENT`` and show the message verbatim, so messages name
    the offending field and value precisely.
    """
