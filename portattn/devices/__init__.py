"""Device descriptions: the frozen ``DeviceSpec``, the catalog of known devices, the live probes
(``probe/cpu.py``, ``probe/cuda.py``, ``probe/opencl.py``) and name resolution (``device_named``).

Pure Python; a probe imports torch, cupy or pyopencl only when it is called.
"""

from .catalog import CATALOG, lookup
from .description import DeviceSpec, MatrixUnit
from .resolve import cuda_index, device_named

__all__ = ["CATALOG", "DeviceSpec", "MatrixUnit", "cuda_index", "device_named", "lookup"]
