"""rankcut: compress trained PyTorch models with low-rank factorizations.

The decompositions live in :mod:`rankcut.decompose`; factorized layers, planning, fine-tuning and
reporting build on them.
"""

from . import decompose

__version__ = "0.1.0"

__all__ = ["__version__", "decompose"]
