"""The backend-neutral tiling planner: device descriptions in, tile plans out.

Pure Python with no framework imports (the live probes import torch, cupy or pyopencl only when
called). ``plan(spec, device)`` is the entry point; ``catalog`` holds known devices and ``probe``
reads the live ones.
"""

from .catalog import CATALOG, lookup
from .device import DTYPE_BYTES, DeviceSpec, MatrixUnit
from .plan import TilePlan
from .planner import plan
from .resolve import device_named

__all__ = ["CATALOG", "DTYPE_BYTES", "DeviceSpec", "MatrixUnit", "TilePlan", "device_named", "lookup", "plan"]
