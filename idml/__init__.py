"""idml: Introspective Deep Metric Learning for image retrieval, with fused C++/CUDA ops."""
from idml import ops  # noqa: F401  (loads the compiled operators, or warns once)

__version__ = "0.1.0"
