"""Helpers of the ``onnx-qdq`` target (:mod:`qpipe.backends.onnx_qdq`)."""
