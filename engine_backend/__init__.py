"""engine_backend: block-sparse attention kernels and vLLM/SGLang attention backends."""

from .format import BSR
from .variants import Variant

__version__ = "0.1.0"
__all__ = ["BSR", "Variant", "__version__"]
