"""portattn: exact FlashAttention-style attention on whatever accelerator you have.

``attention(q, k, v)`` is the front door; ``explain`` says which backend and tile plan a call gets;
``backends()`` lists every backend and why it is or is not usable here.
"""

from .api import attention, attention_varlen, explain, plan, tune
from .devices import DeviceSpec
from .kvcache import attention_with_kvcache, explain_with_kvcache
from .sdpa import scaled_dot_product_attention
from .spec import AttentionSpec
from .status import BackendStatus, available_backends, backends
from .tiling import TilePlan
from .version import __version__

__all__ = [
    "__version__",
    "AttentionSpec",
    "BackendStatus",
    "DeviceSpec",
    "TilePlan",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "available_backends",
    "backends",
    "explain",
    "explain_with_kvcache",
    "plan",
    "scaled_dot_product_attention",
    "tune",
]
