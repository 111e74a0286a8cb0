"""The interface every backend implements, and the checks all of them share.

A backend *declares* what it can do (``Capabilities``) and answers two questions with complete
lists of readable reasons: can it run on this machine at all (``unavailable_reasons``), and can it
run this call (``not_supported_reasons``). Empty list = yes. Which usable backend *should* run is
not decided here but by each backend's ``auto_priority`` and the dispatcher.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Mapping

from ..devices import DeviceSpec
from ..memo import by_identity
from ..spec import FEATURES
from ..tiling import TilePlan
from ..tiling import plan as make_plan
from ..tiling.decode import MAX_QUERIES, DecodePlan, DecodeProblem, plan_decode, with_decode_reason


@dataclass(frozen=True)
class Capabilities:
    device_kinds: frozenset[str]  # where the data may live: "cpu", "cuda", ...
    dtypes: frozenset[str]
    min_head_dim: int = 1
    max_head_dim: int = 256
    backward: bool = True
    features: frozenset[str] = frozenset()  # the spec.FEATURES it runs (forward and, if ``backward``, backward)
    feature_notes: Mapping[str, str] = dataclasses.field(default_factory=dict)  # feature -> how, or why not
    notes: tuple[str, ...] = ()  # e.g. "fp16/bf16 inputs are computed in fp32"
    device_choice: bool = False  # honours ``device=`` (a compute device for host arrays)
    min_compute_capability: tuple[int, int] | None = None  # CUDA devices older than this are refused (base class)
    kvcache: str | None = None  # how ``decode_kvcache`` reads a KV cache in place; None: it has no such kernel


class Backend(ABC):
    """One way of running attention. Subclasses are stateless; the registry holds one instance."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line: the hardware it serves and how
    extra: ClassVar[str | None]  # the pip extra that installs what it needs
    compute_kind: ClassVar[str]  # the array kind its kernels take: "numpy" or "torch"
    # a "numpy" backend that takes torch's bfloat16 tensors as uint16 views of their bits (arrays.to_numpy_bits) and
    # gives bfloat16 results back as such bits, converting them itself; else call.py widens and narrows
    bfloat16_bits: ClassVar[bool] = False
    capabilities: ClassVar[Capabilities]
    auto_priority: ClassVar[Mapping[str, int]] = {}  # device kind -> rank for backend="auto"; absent: never

    @functools.cached_property
    def _unavailable(self) -> tuple[str, ...]:
        return tuple(self._check_available())

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all (missing package, no device)."""
        return list(self._unavailable)

    @property
    def usable(self) -> bool:
        return not self._unavailable

    def _check_available(self) -> list[str]:
        """Subclasses: import what they need and report what is missing. Called once."""
        return []

    def _missing_modules(self, needed) -> list[str]:
        """For ``_check_available``: each (module, why it is needed) that does not import, with the pip
        extra that installs it."""
        missing = []
        for module, why in needed:
            try:
                __import__(module)
            except ImportError as error:
                missing.append(f"{module} is not installed ({why}; pip install 'portattn[{self.extra}]'): {error}")
        return missing

    def declared_capabilities(self) -> Capabilities:
        """What the backend does on its target hardware, for the capability table (a backend that can
        also run under an emulator, as Triton's interpreter, reports its real target here)."""
        return self.capabilities

    def not_supported_reasons(self, spec) -> list[str]:
        """Every reason this backend cannot run ``spec`` (``AttentionSpec``); empty when it can."""
        caps = self.capabilities
        if spec.device_kind not in caps.device_kinds:
            # that alone refuses it; probing availability would import a GPU framework (and start its
            # driver, ~0.5 GB of memory) for a call whose data it could never take
            return [f"data is on {spec.device}; {self.name} runs on {', '.join(sorted(caps.device_kinds))}"]
        reasons = self.unavailable_reasons()
        if spec.compute_device is not None and not caps.device_choice:
            reasons.append(f"device={spec.compute_device!r} names a compute device, but {self.name} computes where "
                           "the data lives; drop device= or use backend='opencl'")
        if caps.min_compute_capability is not None and spec.device_kind == "cuda" and not reasons:
            reasons += self._compute_capability_reasons(spec)
        if spec.dtype not in caps.dtypes:
            reasons.append(f"dtype {spec.dtype} is not supported; {self.name} takes {', '.join(sorted(caps.dtypes))}")
        if not caps.min_head_dim <= spec.head_dim <= caps.max_head_dim:
            reasons.append(f"head dim {spec.head_dim} is outside {self.name}'s range {caps.min_head_dim}..{caps.max_head_dim}")
        if spec.requires_grad and not caps.backward:
            reasons.append(f"inputs require grad but {self.name} has no backward pass")
        for feature in sorted(spec.features - caps.features):
            why = caps.feature_notes.get(feature, "not implemented")
            reasons.append(f"{self.name} does not support {feature} ({FEATURES[feature].split(':')[0]}): {why}")
        return reasons + self._extra_reasons(spec)

    def _extra_reasons(self, spec) -> list[str]:
        """Subclasses: refusals the declared capabilities cannot express."""
        return []

    def _compute_capability_reasons(self, spec) -> list[str]:
        """The one check of ``Capabilities.min_compute_capability``, against the probed device."""
        wanted = self.capabilities.min_compute_capability
        try:
            found = self.device(spec).compute_capability
        except (ImportError, RuntimeError) as error:
            return [f"cannot read the compute capability of {spec.device}: {error}"]
        if found is not None and tuple(found) < wanted:
            return [f"{self.name} needs compute capability {wanted[0]}.{wanted[1]}+; {spec.device} is {found[0]}.{found[1]}"]
        return []

    def _plan_reasons(self, spec) -> list[str]:
        """For ``_extra_reasons`` of backends whose planner can refuse: why no forward tiling fits, or
        why no backward does when the inputs require grad (the plan's last reason says)."""
        try:
            plan = self.plan(spec)
        except ValueError as error:
            return [str(error)]
        if spec.requires_grad and plan.backward is None:
            return [f"inputs require grad but no backward tiling fits: {plan.reasons[-1]}"]
        return []

    @abstractmethod
    def device(self, spec) -> DeviceSpec:
        """The description of the device this backend would run ``spec`` on."""

    def plan(self, spec, device: DeviceSpec | None = None) -> TilePlan:
        return with_decode_reason(make_plan(spec, device or self.device(spec)), spec, self.forward_decode_plan(spec))

    def takes_decode(self, spec) -> bool:
        """Whether ``forward`` runs ``spec`` (a few queries per sequence) through this backend's decode kernel
        rather than its tiled one; a backend with such a kernel says when (its decode module's ``takes``)."""
        return False

    def forward_decode_plan(self, spec) -> DecodePlan | None:
        """The decode plan ``forward`` runs ``spec`` with (``takes_decode``), or None for the tiled forward:
        cached per spec, since a forward asks on every call."""
        return _forward_decode_plan(self, spec)

    def retile(self, plan: TilePlan, changes: Mapping[str, object]) -> TilePlan | None:
        """``plan`` with some tile fields changed (an autotuning candidate, or a remembered winner), or
        None when this backend's kernels cannot run that configuration (backward fields changed on a plan
        without a backward, for one). ``changes`` names fields as ``TilePlan.with_changes`` takes them
        (``"block_q"``, ``"backward.block_q"``). Backends whose plans derive figures from the tiles (shared
        memory, threads) recompute them here."""
        try:
            return plan.with_changes(changes)
        except ValueError:
            return None

    def kvcache_reasons(self, spec, page_size: int) -> list[str]:
        """Every reason ``decode_kvcache`` cannot run ``spec`` (the attention of a KV-cache call, whose
        ``seqlen_k`` is the longest sequence) on a cache of ``page_size`` keys per page (0: contiguous);
        empty when it can. ``attention_with_kvcache`` gathers the cache for ``forward`` otherwise."""
        if self.capabilities.kvcache is None:
            return [f"{self.name} has no kernel that reads a KV cache in place"]
        reasons = self.not_supported_reasons(spec)
        if spec.seqlen_q > MAX_QUERIES:
            reasons.append(f"{spec.seqlen_q} queries per sequence: the decode kernel packs at most {MAX_QUERIES} "
                           "(longer query blocks are prefill work)")
        if spec.requires_grad:
            reasons.append("inputs require grad and the decode kernel has no backward")
        return reasons

    def decode_plan(self, spec, page_size: int, total_keys: int, device: DeviceSpec | None = None) -> DecodePlan:
        return plan_decode(DecodeProblem(spec, page_size, total_keys), device or self.device(spec))

    def decode_kvcache(self, q, k_cache, v_cache, block_table, lengths, spec, plan: DecodePlan, extras):
        """``(out, lse)`` of one decoding step read from the cache where it lies, for arrays of
        ``compute_kind``: q (B, Nq, H, D); k_cache, v_cache (B, Nmax, H_kv, D), or pages
        (num_blocks, page_size, H_kv, D) with ``block_table`` (B, max_blocks) int32 (None when
        contiguous); ``lengths`` (B,) int32, each sequence's keys (None, for a backend whose
        ``compute_kind`` is "torch": every sequence holds the whole cache). Bottom-right alignment per sequence
        (``portattn/kvcache.py``). out is (B, Nq, H, D) in q's dtype, lse float32 (B, H, Nq). Only
        backends whose ``capabilities.kvcache`` is set implement it."""
        raise NotImplementedError(f"{self.name} has no kernel that reads a KV cache in place")

    def decode_kvcache_output(self, q, k_cache, v_cache, block_table, lengths, spec, plan: DecodePlan, extras):
        """``out`` alone of ``decode_kvcache``, for a caller that needs no LSE (``forward_output``'s twin)."""
        return self.decode_kvcache(q, k_cache, v_cache, block_table, lengths, spec, plan, extras)[0]

    @abstractmethod
    def forward(self, q, k, v, spec, plan: TilePlan, extras):
        """``(out, lse)`` for (B, H, N, D) arrays of ``compute_kind`` (k, v with ``spec.kv_heads``
        heads) and the call's ``Extras`` in that kind (``portattn/extras.py`` has the semantics);
        lse is (B, H, Nq), natural log, at least float32 (float64 where the backend computes in
        float64). Varlen: q, k, v are (1, H, total, D) and so are out and lse's (1, H, total_q)."""

    def forward_output(self, q, k, v, spec, plan: TilePlan, extras):
        """``out`` alone, for a caller that needs no LSE (inference): ``forward``'s, unless the backend's
        kernels can skip writing the LSE."""
        return self.forward(q, k, v, spec, plan, extras)[0]

    @abstractmethod
    def backward(self, grad_out, q, k, v, out, lse, spec, plan: TilePlan, extras):
        """``(dq, dk, dv)`` shaped as q, k, v, for arrays of ``compute_kind``."""

    def dropout_keep(self, spec, extras):
        """The (B, H, Nq, Nk) bool numpy mask of the weights this backend keeps for ``spec.dropout_p``
        and ``extras.dropout_seed`` (varlen: indexed by each sequence's own rows and keys) --
        materialized from the same counter-based generator its kernels use, for tests and debugging."""
        raise NotImplementedError(f"{self.name} has no dropout")


# Every backend by name, filled by ``@register`` as the backend modules are imported
REGISTRY: dict[str, Backend] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: one instance of each backend goes into ``REGISTRY``."""
    REGISTRY[cls.name] = cls()
    return cls


@by_identity
def _forward_decode_plan(backend, spec):
    if backend.capabilities.kvcache is None or not backend.takes_decode(spec):
        return None
    return backend.decode_plan(spec, 0, spec.batch * spec.seqlen_k)
