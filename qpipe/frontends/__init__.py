"""Turning a user's model into a float fx graph plus what it needs to run on audio.

Nothing here knows about quantization.
"""
from qpipe.frontends.model import FloatModel

__all__ = ["FloatModel"]
