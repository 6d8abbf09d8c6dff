"""qpipe: integer-only zero-shot INT8 quantization of speech recognition models.

One sub-package per layer, importing downward only:
``ir`` (graph contract, integer ops, pass machinery) <- ``frontends`` (models in)
<- ``passes`` (the pipeline) <- ``backends`` (targets out) <- ``asr`` (decoding,
WER) <- the application here (``api``, ``cli``, ``inspect``).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
