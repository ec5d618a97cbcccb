"""Backends keep an account's usage: in this process, or shared through Redis."""

from ._base import Backend, Demand, DimensionStatistics, Grant, Refusal
from .memory import MemoryBackend

__all__ = ["Backend", "Demand", "DimensionStatistics", "Grant", "MemoryBackend", "Refusal"]
