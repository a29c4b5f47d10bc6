"""hermesd: PipeLoad streaming inference for Transformer models on memory-constrained machines.

``hermesd.load`` and ``hermesd.Engine`` are imported on first use, so that ``hermesd --help``, the
daemon's config check and the planner do not pay for importing torch.
"""

from typing import Any

from hermesd.version import __version__

__all__ = ["Engine", "load", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load":
        from hermesd.planning import load

        return load
    if name == "Engine":
        from hermesd.engine import Engine

        return Engine
    raise AttributeError(f"module 'hermesd' has no attribute {name!r}")
