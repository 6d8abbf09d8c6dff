"""Backends turn an integer graph into something that runs elsewhere, and run it.

Today the integer graph runs through the exact ``qpipe::`` reference kernels
(``torch.export`` program, CPU). PyTorch int8 (VNNI, CUDA), ONNX QDQ and
TensorRT backends are next (../shared/ROADMAP.md): each walks the integer graph
op by op, reading scales and (m, s) pairs from the node arguments.
"""
