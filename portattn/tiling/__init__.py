"""The backend-neutral tiling planner: a device description and a problem in, a tile plan out.

Pure Python with no framework imports. ``plan(spec, device)`` is the entry point; device
descriptions (the frozen ``DeviceSpec``, the catalog, the live probes) live in ``portattn.devices``.
Backend-specific rules (cupy's WMMA tiles, OpenCL's work-item grids) live in their backends'
``plan.py``.
"""

from .plan import TilePlan
from .planner import plan

__all__ = ["TilePlan", "plan"]
