"""The plan's types: `TilePlan` with its `BackwardPlan` (or None), `assemble_plan` as the one way every
planner builds a plan, the OpenCL rules' own `OpenCLPlan`, and field names as autotuning uses them."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

from portattn import tiling, tuning
from portattn.backends import registry
from portattn.backends.cupy import plan as cupy_rules
from portattn.backends.opencl import plan as opencl_rules
from portattn.devices import CATALOG
from portattn.spec import AttentionSpec
from portattn.tiling import BackwardPlan, TilePlan, assemble_plan, plan

PACKAGE = Path(__file__).resolve().parents[2] / "portattn"
PLANNING_FILES = sorted(PACKAGE.glob("tiling/*.py")) + sorted(PACKAGE.glob("backends/*/plan.py"))
MAX_PARAMETERS = 40


def _spec(**overrides) -> AttentionSpec:
    fields = {"batch": 2, "heads": 8, "seqlen_q": 1024, "seqlen_k": 1024, "head_dim": 64, "dtype": "float16"}
    return AttentionSpec(**{**fields, **overrides})


@pytest.mark.parametrize("path", PLANNING_FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_planning_function_takes_many_parameters(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
            assert count <= MAX_PARAMETERS, (path.name, getattr(node, "name", "lambda"), count)


def test_assemble_plan_is_public_and_keyword_only():
    assert tiling.assemble_plan is assemble_plan
    parameters = inspect.signature(assemble_plan).parameters
    positional = [n for n, p in parameters.items() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    assert positional == ["spec", "device"]
    assert assemble_plan.__doc__


def test_the_shared_plan_has_no_backward_or_opencl_fields():
    names = {f.name for f in dataclasses.fields(TilePlan)}
    assert "backward" in names and not any(n.startswith("backward_") for n in names)
    opencl_only = {"vector_width", "head_dim_chunk", "item_rows", "item_vectors"}
    assert not names & opencl_only
    assert opencl_only <= {f.name for f in dataclasses.fields(opencl_rules.OpenCLPlan)}


@pytest.mark.parametrize("device", sorted(CATALOG))
def test_every_planner_returns_a_backward_plan_or_none(device):
    dev = CATALOG[device]
    spec = _spec(dtype="float16" if dev.kind == "gpu" else "float32")
    generic = plan(spec, dev)
    assert type(generic) is TilePlan and isinstance(generic.backward, BackwardPlan)  # G/C rules always plan one
    assert generic.backward.work_units == spec.batch * spec.heads * -(-spec.seqlen_k // generic.backward.block_k)
    ocl = opencl_rules.plan(spec, dev)
    assert isinstance(ocl, opencl_rules.OpenCLPlan)
    assert ocl.backward is None or isinstance(ocl.backward, BackwardPlan)
    if dev.kind == "gpu":
        wmma = cupy_rules.plan(spec, dev)
        assert type(wmma) is TilePlan and wmma.backward is not None


def test_a_plan_without_backward_says_so():
    """W5: head dim 256 leaves no backward tiling within 255 registers; the plan says so and refuses changes to it."""
    p = cupy_rules.plan(_spec(head_dim=256), CATALOG["h100"])
    assert p.backward is None and "no tiling" in p.reasons[-1]
    assert "no backward tiling fits" in p.summary() and "no backward" in p.describe()
    with pytest.raises(ValueError):
        p.with_changes({"backward.block_q": 32})
    with pytest.raises(ValueError):
        p.value("backward.block_q")
    assert registry()["cupy"].retile(p, {"backward.block_q": 32}) is None
    assert registry()["cupy"].retile(p, {"block_k": 32}) is not None


def test_changes_and_values_by_name():
    p = plan(_spec(), CATALOG["h100"])
    changed = p.with_changes({"block_q": 64, "backward.block_q": 16, "backward.dq_separate": False})
    assert (changed.block_q, changed.backward.block_q, changed.backward.dq_separate) == (64, 16, False)
    assert changed.backward.block_k == p.backward.block_k and changed.block_k == p.block_k
    assert changed.value("backward.block_q") == 16 and changed.value("block_q") == 64
    assert p.with_changes({}) == p
    with pytest.raises(TypeError):
        p.with_changes({"backward.no_such_field": 1})
    swept = tuning.candidates(p, tuning.BACKWARD_SPACE)
    assert {(c.backward.block_k, c.backward.block_q) for c in swept[1:]} == {(k, q) for k in (64, 128) for q in (32, 64)}


def test_opencl_retile_keeps_its_plan_type():
    p = opencl_rules.plan(_spec(dtype="float32"), CATALOG["h100"])
    other = registry()["opencl"].retile(p, {"backward.block_q": 16})
    assert isinstance(other, opencl_rules.OpenCLPlan) and other.backward.block_q == 16
    assert other.backward.sram_bytes == opencl_rules.backward_grid(other, p.head_dim_padded).backward_local_bytes()


def test_cache_entries_with_the_old_backward_names_are_still_read(monkeypatch, tmp_path):
    from portattn.api import prepare

    q = np.zeros((1, 2, 64, 32), np.float32)
    call = prepare(q, q, q, backend="numba")
    monkeypatch.setenv("PORTATTN_TUNE_CACHE", str(tmp_path / "tuned.json"))
    monkeypatch.setattr(tuning, "_MEMORY", {})
    entry = {"block_q": 32, "block_k": 32, "warps": 1, "stages": 1, "backward_block_q": 16, "backward_block_k": 32,
             "backward_warps": 1, "backward_stages": 1, "backward_dq_separate": False}
    tuning._MEMORY[tuning.cache_key(call)] = entry
    tuned = tuning.remembered(call)
    assert (tuned.block_q, tuned.backward.block_q, tuned.backward.block_k, tuned.backward.dq_separate) == (32, 16, 32, False)
    tuning._remember(call, tuned, save=False)
    assert tuning._MEMORY[tuning.cache_key(call)]["backward.block_q"] == 16
