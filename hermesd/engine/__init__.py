"""Executing a store: stage reads, the buffer ring, loader threads, stage hooks and the Engine."""

from hermesd.engine.engine import Engine

__all__ = ["Engine"]
