"""Comparisons with the float64 reference, shared by the conformance tests."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the conformance suite builds its inputs and checks autograd with torch")


def device_for(backend) -> str:
    return "cuda" if "cuda" in backend.capabilities.device_kinds else "cpu"


def as64(x) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def amax(x) -> float:
    x = x if isinstance(x, np.ndarray) else as64(x)
    return float(np.abs(x).max()) if x.size else 0.0


def check_close(name: str, got, want: np.ndarray, bound: float, magnitude: float = 0.0) -> None:
    """Normwise relative error against max(|want|, ``magnitude``): a gradient that is truly zero
    (one visible key; a one-hot softmax) is judged against the size of the terms it sums."""
    got = as64(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    assert not np.isnan(got).any(), f"{name}: NaN in the result"
    if want.size == 0:
        return
    scale = max(amax(want), magnitude, 1e-30)
    error = float(np.abs(got - want).max()) / scale
    assert error <= bound, f"{name}: normwise relative error {error:.3g} exceeds the bound {bound:.3g}"


def check_lse(got, want: np.ndarray, bound: float) -> None:
    got = as64(got)
    assert got.dtype == np.float64 and got.shape == want.shape
    empty = np.isneginf(want)
    assert np.array_equal(np.isneginf(got), empty), "LSE must be -inf exactly for rows that see no key"
    if (~empty).any():
        error = float((np.abs(got[~empty] - want[~empty]) / np.maximum(1.0, np.abs(want[~empty]))).max())
        assert error <= bound, f"lse: relative error {error:.3g} exceeds the bound {bound:.3g}"


def check_close_finite(name: str, got, want, tol: float) -> None:
    """``got`` (a tensor) against ``want`` where ``want`` is finite, relative to max(1, |want|); no NaN
    anywhere, and infinities (a row that sees no key) exactly where ``want`` has them."""
    got = got.detach().cpu().double().numpy()
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not np.isnan(got).any(), f"{name} has NaN"
    finite = np.isfinite(want)
    assert (np.isfinite(got) == finite).all(), f"{name}: infinities differ ({(~finite).sum()} expected)"
    if finite.any():
        err = np.abs(got[finite] - want[finite]).max() / max(1.0, np.abs(want[finite]).max())
        assert err <= tol, f"{name}: error {err:.2e} > {tol:.0e}"

