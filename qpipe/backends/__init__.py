"""Backends: targets behind one small protocol and a registry.

A target writes an output folder's model files from the integer graph and loads
them back as float features -> integer logits (:mod:`qpipe.backends.target`);
everything else about an output folder is shared (:mod:`qpipe.backends.folder`).
Adding a target is one module in this folder that defines a :class:`Target`
subclass under ``@register_target``; the registry imports it when first asked
(outside qpipe: an entry point in the group ``qpipe.targets``).

Built in: ``reference`` (torch.export program of the exact ``qpipe::`` kernels),
``torch-int8`` (the same integers on fast CPU and CUDA kernels), ``onnx-qdq`` (ONNX
Runtime) and ``tensorrt`` (an engine from a TensorRT QDQ layout).

Layering: this package may import ``qpipe.ir`` and ``qpipe.frontends``, never
``qpipe.passes``, ``qpipe.asr`` or the application (``qpipe.api``, ``qpipe.cli``,
``qpipe.inspect``).
"""
from qpipe.backends.target import (  # noqa: F401
    Runner,
    SaveRecord,
    Target,
    check_available,
    get_target,
    list_targets,
    register_target,
)
from qpipe.backends.folder import (  # noqa: F401
    DEFAULT_TARGET,
    FORMAT,
    QuantizedModel,
    is_output_folder,
    open_folder,
    read_meta,
    write_folder,
)
