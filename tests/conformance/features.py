"""The feature cases of the conformance suite: every feature of ``portattn.spec.FEATURES``, with
causal and without, in float32/float16/bfloat16, at odd lengths with Nq != Nk, and one case that
combines them all. Each case says how to build its keyword arguments from a seeded generator.

Lengths are small (the Triton interpreter runs these in CI) but span several of the H100 plan's
64/128-wide tiles, so that whole-tile skipping (causal, window, block-sparse) is exercised, and
every feature has a case with rows that see no key at all.

The slow CPU emulations -- Triton's interpreter (TRITON_INTERPRET=1) and OpenCL on a CPU device
(PoCL) -- run by default each case, causal and not, in one of the three dtypes (rotating, so each
feature meets two of them and each dtype a third of the cases): ``FEATURE_EMULATOR_DEFAULT`` and
``VARLEN_EMULATOR_DEFAULT``. ``pytest --full-grid`` runs all three dtypes there too; every other
backend always does (``tests/conformance/conftest.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cases import LOW_PRECISION, emulator_dtype

DTYPES = tuple(LOW_PRECISION)  # the rotation of emulator_dtype runs in this order
SHORT = {"float64": "fp64", "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class FeatureCase:
    feature: str  # a FEATURES name, or "all" for everything at once
    causal: bool
    dtype: str
    seqlen_q: int = 150
    seqlen_k: int = 201
    head_dim: int = 40
    batch: int = 2
    heads: int = 2  # two heads keep the interpreter's run short; the GQA cases use four
    kv_heads: int = 2
    magnitude: float = 1.0  # inputs are N(0, magnitude^2)

    @property
    def id(self) -> str:
        n = f"{self.seqlen_q}q{self.seqlen_k}k"
        heads = f"{self.heads}" if self.kv_heads == self.heads else f"{self.heads}by{self.kv_heads}"
        return f"{self.feature}-{SHORT[self.dtype]}-{'causal' if self.causal else 'full'}-{self.batch}x{heads}x{n}x{self.head_dim}"


def alibi_slopes(heads: int):
    """The ALiBi paper's geometric slopes 2^(-8 h / H), h = 1..H."""
    return [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)]


def feature_kwargs(case: FeatureCase, torch, device: str, gen) -> dict:
    """The ``attention`` keywords that switch the case's feature(s) on, as torch tensors on ``device``."""
    b, h, nq, nk = case.batch, case.heads, case.seqlen_q, case.seqlen_k
    dtype = getattr(torch, case.dtype)
    features = {case.feature} if case.feature != "all" else {
        "bottom_right", "window", "additive_mask", "alibi", "softcap", "key_padding", "dropout"}
    kwargs = {}
    if "bottom_right" in features or case.feature == "decoding":
        kwargs["align"] = "bottom-right"
    if "window" in features:
        kwargs["window"] = (37, None if case.causal else 11)
    if "bool_mask" in features:
        mask = torch.rand(b, 1, nq, nk, generator=gen) < 0.7
        mask[:, :, 5] = False  # a row that sees no key
        kwargs["attn_mask"] = mask.to(device)
    if "additive_mask" in features:
        mask = (torch.randn(nq, nk, generator=gen) * 2).to(dtype)
        mask[7] = float("-inf")  # a row whose every score is -inf
        mask[:, 3] = float("-inf")
        kwargs["attn_mask"] = mask.to(device)
    if "alibi" in features:
        kwargs["alibi_slopes"] = torch.tensor(alibi_slopes(h), dtype=torch.float32, device=device)
    if "softcap" in features:
        kwargs["softcap"] = 5.0
    if "block_sparse" in features:
        block_size = (32, 64)
        blocks = (-(-nq // block_size[0]), -(-nk // block_size[1]))
        mask = torch.rand(b, h, *blocks, generator=gen) < 0.5
        mask[:, :, 1] = False  # a row of blocks with nothing to see
        mask[:, :, 0, 0] = True
        kwargs["block_mask"] = mask.to(device)
        kwargs["block_size"] = block_size
    if "key_padding" in features:
        padding = torch.ones(b, nk, dtype=torch.bool)
        padding[-1, nk - nk // 3:] = False  # the last sequence of the batch is a third padding
        kwargs["key_padding_mask"] = padding.to(device)
    if "dropout" in features:
        kwargs["dropout_p"] = 0.25
        kwargs["dropout_seed"] = 1234
    return kwargs


def _shapes(causal: bool, dtype: str) -> list[FeatureCase]:
    return [
        FeatureCase("gqa", causal, dtype, heads=4, kv_heads=2),
        FeatureCase("gqa", causal, dtype, heads=4, kv_heads=1, seqlen_q=77, seqlen_k=77, head_dim=64),  # MQA
        FeatureCase("bottom_right", causal, dtype, seqlen_q=37, seqlen_k=150),
        FeatureCase("bottom_right", causal, dtype, seqlen_q=150, seqlen_k=37),  # the first rows see nothing
        FeatureCase("window", causal, dtype),
        FeatureCase("bool_mask", causal, dtype),
        FeatureCase("additive_mask", causal, dtype),
        FeatureCase("alibi", causal, dtype),
        FeatureCase("softcap", causal, dtype, magnitude=3.0),
        FeatureCase("block_sparse", causal, dtype),
        FeatureCase("key_padding", causal, dtype),
        FeatureCase("decoding", causal, dtype, seqlen_q=3, seqlen_k=1000, heads=4, kv_heads=1, head_dim=64),
        FeatureCase("dropout", causal, dtype),
        FeatureCase("all", causal, dtype, heads=4, kv_heads=2, magnitude=2.0),
    ]


def _cases() -> tuple[list[FeatureCase], frozenset[str]]:
    """The full grid, and the ids of its cases the CPU emulations run by default."""
    cases, emulator_default = [], set()
    for causal in (False, True):
        for dtype in DTYPES:
            shapes = _shapes(causal, dtype)
            cases += shapes
            emulator_default |= {case.id for index, case in enumerate(shapes) if dtype == emulator_dtype(index, causal)}
    return cases, frozenset(emulator_default)


FEATURE_CASES, FEATURE_EMULATOR_DEFAULT = _cases()

# varlen: per-sequence (queries, keys), including an empty sequence and a single query
VARLEN_LENGTHS = ((37, 50), (1, 13), (0, 5), (90, 90), (64, 129))
VARLEN_CASES = [(causal, dtype, align) for causal in (False, True) for dtype in DTYPES
                for align in ("top-left", "bottom-right")]
# the CPU emulations' default: each (causal, align) in one dtype, rotating (as for the feature cases;
# shifted once more when causal, so the four pairs take all three dtypes)
VARLEN_EMULATOR_DEFAULT = frozenset((causal, emulator_dtype(index + causal, causal), align)
                                    for causal in (False, True) for index, align in enumerate(("top-left", "bottom-right")))
