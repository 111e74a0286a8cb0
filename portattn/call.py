"""``PreparedCall``: a validated call bound to its backend and tile plan.

What ``attention`` builds once per distinct call (and caches for torch and pyopencl arrays) and what
the autograd function and the torch custom op run: arrays are converted to the backend's kind at this
boundary and back to the caller's kind, dtype and device on the way out.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import math
import threading
import time
from dataclasses import dataclass, field

from . import arrays
from .backends import Backend
from .extras import NONE, Extras
from .spec import DTYPE_BYTES, AttentionSpec
from .tiling import TilePlan


@dataclass(frozen=True)
class PreparedCall:
    """A validated call bound to a backend and its plan; converts arrays at the backend boundary."""

    spec: AttentionSpec
    backend: Backend
    plan: TilePlan
    # the passes ("forward", "backward") that have run once: their first-call notice is done (kept on the call,
    # not by its id in a global set, where a new call could take a freed one's id and its notice)
    ran: set = field(default_factory=set, init=False, compare=False, repr=False)

    def _to_backend(self, *xs):
        convert = self._converters[0]
        return [convert(x) for x in xs]

    def _to_caller(self, x, dtype: str | None):
        return self._converters[1](x, dtype)

    @functools.cached_property
    def _converters(self):
        """(to the backend's kind, back to the caller's) -- ``arrays.convert`` and ``arrays.restore``, or the
        direct calls they come down to for torch tensors (a repeated small call is mostly this glue)."""
        spec, kind = self.spec, self.backend.compute_kind
        if spec.array_kind == "torch" and kind in ("numpy", "torch") and spec.dtype != "bfloat16":
            torch = sys.modules["torch"]  # a torch caller: imported
            dtypes = {name: getattr(torch, name) for name in DTYPE_BYTES}

            def to_caller(x, dtype):
                if not isinstance(x, torch.Tensor):
                    x = torch.from_numpy(x)
                return x if dtype is None or x.dtype is dtypes[dtype] else x.to(dtypes[dtype])

            if kind == "numpy":  # CPU tensors (the only kind a numpy backend is given): shared-memory views
                return (lambda x: x.detach().numpy()), to_caller
            return (lambda x: x), to_caller
        if spec.array_kind == "torch" and spec.dtype == "bfloat16" and self.backend.bfloat16_bits:
            # bits both ways, no torch conversion: the backend widens and narrows them (bfloat16 results; LSE float32)
            torch = sys.modules["torch"]
            return arrays.to_numpy_bits, (lambda x, dtype: arrays.from_numpy_bits(x) if dtype == "bfloat16"
                                          else torch.from_numpy(x))
        device = spec.device
        return ((lambda x: arrays.convert(x, kind, device)),
                (lambda x, dtype: arrays.restore(x, spec.array_kind, dtype, device)))

    def _extras_to_backend(self, extras: Extras) -> Extras:
        if extras is NONE:
            return extras
        return extras.map_arrays(lambda x: arrays.convert(x, self.backend.compute_kind, self.spec.device))

    def forward(self, q, k, v, extras: Extras = NONE):
        """(B, H, N, D) arrays of the caller's kind in; ``(out, lse)`` of that kind out.

        The LSE keeps the backend's precision (float64 for float64 inputs) so that the backward
        pass, which recomputes P from it, loses nothing; ``attention`` hands users float32.
        """
        (out, lse), as_is = self._on_backend(self.backend.forward, q, k, v, extras)
        if as_is:
            return out, lse
        return self._to_caller(out, self.spec.dtype), self._to_caller(lse, None)

    def output(self, q, k, v, extras: Extras = NONE):
        """``forward``'s ``out`` alone, for a caller that needs no LSE: a backend may then skip writing it."""
        out, as_is = self._on_backend(self.backend.forward_output, q, k, v, extras)
        return out if as_is else self._to_caller(out, self.spec.dtype)

    def _on_backend(self, run, q, k, v, extras: Extras):
        """(``run`` -- the backend's forward or forward_output -- on the backend's arrays, whether its result is
        already the caller's): torch tensors to a torch backend, after the first call, have nothing to convert
        and no notice to arm."""
        if self._same_arrays and "forward" in self.ran:
            return run(q, k, v, self.spec, self.plan, self._extras_to_backend(extras)), True
        with _first_call_notice(self, "forward"):
            return run(*self._to_backend(q, k, v), self.spec, self.plan, self._extras_to_backend(extras)), False

    @functools.cached_property
    def _same_arrays(self) -> bool:
        """True when the backend computes on the caller's own array kind and dtype (torch tensors on a
        torch backend): its results go back as they are."""
        return self.spec.array_kind == "torch" and self.backend.compute_kind == "torch" and self.spec.dtype != "bfloat16"

    def backward(self, grad_out, q, k, v, out, lse, extras: Extras = NONE):
        with _first_call_notice(self, "backward"):
            grads = self.backend.backward(*self._to_backend(grad_out, q, k, v, out, lse), self.spec, self.plan,
                                          self._extras_to_backend(extras))
        return tuple(self._to_caller(g, self.spec.dtype) for g in grads)


NOTICE_AFTER_S = 1.0


_QUIET = contextlib.nullcontext()  # one shared context for every call after the first: nothing to build per call


def _first_call_notice(call: PreparedCall, what: str):
    """Say why a first call is slow: numba, Triton, CuPy and OpenCL compile their kernels on first use
    (once per configuration; numba and Triton keep them on disk). Printed only when the first call of
    a prepared call is still running after ``NOTICE_AFTER_S``, so warm and cached starts stay quiet;
    later calls pay one set lookup."""
    return _QUIET if what in call.ran else _timed_notice(call, what)


class _Watch:
    """One daemon thread that prints a first call's notice once the call has run ``NOTICE_AFTER_S``.

    Arming it takes a lock (and wakes the thread only when it would sleep past the new deadline), where a ``threading.Timer`` per
    first call started a thread each time: a model decoding token by token meets a new key length, so a
    first call, in every layer at every step, and thread starts cost milliseconds there. One call is
    watched at a time; a newer first call (another thread's) takes the watch over."""

    def __init__(self):
        self._condition = threading.Condition()
        self._armed = None  # (deadline, message maker, token) of the call being watched
        self._until = math.inf  # when the thread wakes by itself next: an earlier deadline must wake it
        self._thread = None

    def arm(self, message) -> object:
        token = object()
        deadline = time.monotonic() + NOTICE_AFTER_S
        with self._condition:
            self._armed = (deadline, message, token)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="portattn-first-call-notice", daemon=True)
                self._thread.start()
            elif deadline < self._until:  # idle, or waiting for a later deadline than this one
                self._condition.notify()
        return token

    def disarm(self, token) -> None:
        with self._condition:  # no wake-up: the thread finds nothing armed at its deadline
            if self._armed is not None and self._armed[2] is token:
                self._armed = None

    def _run(self):
        with self._condition:
            while True:
                if self._armed is None:
                    self._until = math.inf
                    self._condition.wait()
                    continue
                deadline, message, _ = self._armed
                if (left := deadline - time.monotonic()) > 0:
                    self._until = deadline
                    self._condition.wait(left)
                    continue
                self._armed = None
                print(message(), file=sys.stderr, flush=True)


_WATCH = _Watch()


@contextlib.contextmanager
def _timed_notice(call: PreparedCall, what: str):
    token = _WATCH.arm(lambda: (
        f"portattn: the first {call.backend.name} {what} for {call.spec.label()} has taken over {NOTICE_AFTER_S:g} s: "
        f"{call.backend.name} compiles its kernels on first use (once per configuration) ..."))
    try:
        yield
    finally:
        _WATCH.disarm(token)
        call.ran.add(what)
