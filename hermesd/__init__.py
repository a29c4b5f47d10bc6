"""hermesd: PipeLoad streaming inference for Transformer models on memory-constrained machines."""

from hermesd.engine import Engine, load

__all__ = ["Engine", "load", "__version__"]
__version__ = "0.1.0"
