"""idml: Introspective Deep Metric Learning for image retrieval, with fused C++/CUDA ops.

The compiled operators load (or warn once) when a module that uses them is imported
(idml.ops); importing idml alone does not import torch, so the scripts' --help is fast."""

__version__ = "0.1.0"
