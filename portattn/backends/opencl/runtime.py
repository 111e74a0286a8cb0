"""The OpenCL side of the ``opencl`` backend: which device, its queue, built programs, and operands.

Device choice for host arrays (numpy, torch CPU): ``device=`` of the call, else the environment
variable ``PORTATTN_OPENCL_DEVICE`` (``opencl:P:D``, ``P:D``, or a piece of the device's name),
else the first GPU or accelerator of any platform, else the first device. pyopencl arrays are
computed with their own queue. Programs are built once per (context, build options) -- the options
carry the plan's grid and the call's dtype and features -- and pyopencl also keeps the binaries
on disk, so a new process skips the compiler.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import numpy as np

from ...devices import probe

SOURCE_PATH = Path(__file__).with_name("kernels") / "attention.cl"
ENVIRONMENT_VARIABLE = "PORTATTN_OPENCL_DEVICE"
BUILD_FLAGS = ("-cl-std=CL1.2", "-cl-mad-enable")  # no fast-relaxed-math: -inf marks hidden scores
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}  # the .cl file's DTYPE
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}  # bfloat16 as its bits


def devices() -> tuple[tuple[str, object], ...]:
    """Every OpenCL device as ('opencl:P:D', pyopencl.Device), numbered as ``portattn info`` shows them."""
    return probe.opencl_devices()


def choose(requested: str | None = None) -> str:
    """The label of the device host arrays run on (module docstring); ValueError naming what exists."""
    import pyopencl as cl

    listed = devices()
    if not listed:
        raise ValueError("no OpenCL device found: install a driver, or PoCL for the CPU (pip install 'portattn[opencl]')")
    labels = [label for label, _ in listed]
    wanted = requested if requested not in (None, "opencl") else os.environ.get(ENVIRONMENT_VARIABLE) or None
    if wanted is None:
        gpus = [label for label, device in listed if device.type & (cl.device_type.GPU | cl.device_type.ACCELERATOR)]
        return (gpus or labels)[0]
    match = re.fullmatch(r"(?:opencl:)?(\d+):(\d+)", wanted.strip())
    if match:
        label = f"opencl:{int(match.group(1))}:{int(match.group(2))}"
        if label in labels:
            return label
    else:
        named = [label for label, device in listed if wanted.strip().lower() in device.name.lower()]
        if named:
            return named[0]
    source = "device=" if requested not in (None, "opencl") else f"${ENVIRONMENT_VARIABLE}"
    listing = ", ".join(f"{label} ({device.name.strip()})" for label, device in listed)
    raise ValueError(f"{source} {wanted!r} matches no OpenCL device; found: {listing}")


# The smallest program: if a device cannot build this, it can build none of ours
PROBE_SOURCE = "__kernel void portattn_probe(__global float *x) { x[get_global_id(0)] = 1.0f; }"


@functools.lru_cache(maxsize=None)
def compile_problem(label: str) -> str | None:
    """Why the device ``label`` cannot compile OpenCL C, from its build log; None when it can. PoCL
    built against an LLVM that does not know the host CPU fails every build this way (PoCL 3.0's
    wheel on AMD Zen 5: "unknown target CPU 'generic'"), so the backend refuses the device up front
    instead of failing inside the first kernel build."""
    import pyopencl as cl

    try:
        cl.Program(queue_for(label).context, PROBE_SOURCE).build(options=list(BUILD_FLAGS))
    except cl.Error as error:
        text = str(error)
        errors = [line.strip() for line in text.splitlines() if line.strip().lower().startswith("error")]
        return errors[0] if errors else text.strip().splitlines()[0]
    return None


def device_of(label: str):
    return dict(devices())[label]


@functools.lru_cache(maxsize=None)
def queue_for(label: str):
    """One context and in-order queue per device for host arrays, kept for the process."""
    import pyopencl as cl

    context = cl.Context([device_of(label)])
    return cl.CommandQueue(context)


@functools.lru_cache(maxsize=None)
def _source() -> str:
    return SOURCE_PATH.read_text()


@functools.lru_cache(maxsize=256)
def program(context, options: tuple[str, ...]):
    """The built program for a context and build options (the plan's grid, dtype, features)."""
    import pyopencl as cl

    return cl.Program(context, _source()).build(options=list(BUILD_FLAGS + options))


@functools.lru_cache(maxsize=1024)
def kernel(context, options: tuple[str, ...], name: str, scalar_dtypes: tuple | None = None):
    """One kernel object per (program, name): pyopencl's ``program.name`` makes a new one per access.
    ``scalar_dtypes`` (None for each buffer argument, a numpy dtype for each scalar) lets pyopencl pack
    the scalars itself: without it each numpy scalar argument took 8 us to set (200 us of a call's
    host time for the forward's 28 scalars)."""
    import pyopencl as cl

    made = cl.Kernel(program(context, options), name)
    if scalar_dtypes is not None:
        made.set_scalar_arg_dtypes(list(scalar_dtypes))
    return made


@functools.lru_cache(maxsize=8)
def memory_pool(context):
    """The context's pool of device buffers, which results, scratch and uploads are taken from: a
    dropped array's buffer goes back to the pool and the next call of that size reuses it, where a
    fresh buffer from NVIDIA's driver cost 0.45 ms of a 7 ms forward on the H100 ((4, 16, 2048, 128),
    float32). ``memory_pool(context).free_held()`` hands the idle buffers back to the driver."""
    import pyopencl as cl
    import pyopencl.tools

    return pyopencl.tools.MemoryPool(pyopencl.tools.ImmediateAllocator(cl.CommandQueue(context)))


def strides(array) -> tuple[np.int64, np.int64, np.int64]:
    """The batch, head and row strides of a (B, H, N, D) device array, in elements (the kernels' longs)."""
    return tuple(np.int64(s // array.dtype.itemsize) for s in array.strides[:3])


def to_device(x, queue, storage):
    """``x`` on ``queue``'s device as the kernels take it: a whole buffer from its first element, rows
    of adjacent elements (any other strides are passed to the kernels). pyopencl arrays already so
    are used in place; host arrays are copied over."""
    import pyopencl.array as cla

    if isinstance(x, cla.Array):
        usable = x.dtype == storage and x.offset == 0 and (x.strides[-1] == x.dtype.itemsize or x.shape[-1] <= 1)
        if usable:
            return x
        # a view starting inside its buffer, a strided last axis or another dtype: one copy through the
        # host (pyopencl copies only contiguous arrays on the device)
        x = x.get()
    host = np.asarray(x)
    if host.dtype != storage:
        host = host.astype(storage)
    return cla.to_device(queue, np.ascontiguousarray(host), allocator=memory_pool(queue.context))
