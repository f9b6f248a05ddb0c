"""Exceptions shared by several modules of the library (kept here to avoid import cycles)."""

from __future__ import annotations


class WeightsError(RuntimeError):
    """Model weights are missing, unreadable or do not fit the model.

    The message names the file, says where to get the right one and which setting points to it.
    """
