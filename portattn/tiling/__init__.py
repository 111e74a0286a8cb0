"""The backend-neutral tiling planner: a device description and a problem in, a tile plan out.

Pure Python with no framework imports. ``plan(spec, device)`` is the entry point; device
descriptions (the frozen ``DeviceSpec``, the catalog, the live probes) live in ``portattn.devices``.
Backend-specific rules (cupy's WMMA tiles, OpenCL's work-item grids) live in their backends'
``plan.py``; every planner builds its ``TilePlan`` with ``assemble_plan`` from a ``ForwardTiling``
and a ``BackwardTiling`` (or None: no backward fits), and the plan's ``backward`` is a
``BackwardPlan`` or None.
"""

from .plan import BackwardPlan, BackwardTiling, ForwardTiling, TilePlan, assemble_plan
from .planner import plan

__all__ = ["BackwardPlan", "BackwardTiling", "ForwardTiling", "TilePlan", "assemble_plan", "plan"]
