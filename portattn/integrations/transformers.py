"""portattn as an attention implementation of Hugging Face ``transformers``.

``register(backend="auto", name="portattn")`` adds ``name`` to both of transformers' registries, after
which ``attn_implementation=name`` works in ``from_config``/``from_pretrained`` and
``model.set_attn_implementation(name)`` on every model that goes through ``AttentionInterface``:

* ``AttentionMaskInterface``: :func:`mask` -- which mask the model's layers receive. Without
  it transformers hands unknown implementations ``attention_mask=None``, and padded batches are
  silently wrong.
* ``AttentionInterface``: :func:`attention_forward` -- one layer's attention, run by ``portattn.attention``.

This module owns the contract between the two: the mask is the whole truth about which keys a
query sees, as for SDPA. ``mask`` returns

* ``None`` for transformers' plain causal or bidirectional pattern with nothing padded (as for SDPA,
  the layer's ``is_causal`` then says which);
* a ``(B, Nk)`` bool key padding (True = a real key) that carries its pattern -- causal or not, and the
  window of transformers' sliding-window causal one -- for those patterns with padding and for every
  sliding window;
* otherwise (chunked or packed sequences, overlays, static caches, ...) transformers' own
  ``sdpa_mask``: ``(B, 1, Nq, Nk)`` bool, True = attend.

``attention_forward`` rebuilds the first two with portattn's features -- ``causal=True`` with
``align="bottom-right"`` (the queries are the last Nq of the Nk positions, which ``mask`` checked),
``window=(w - 1, 0)`` (transformers shows key ``kv`` to query ``q`` iff ``q - w < kv <= q``) and
``key_padding_mask`` -- and applies a 4-D mask as it is.
"""

from __future__ import annotations

import functools
import re

from portattn import dispatch
from portattn.api import attention
from portattn.sdpa import pad_last

_MISSING = "portattn.integrations.transformers needs transformers and torch: pip install 'portattn[transformers]'"


def _transformers():
    try:
        import torch  # noqa: F401
        import transformers
        from transformers import masking_utils
    except ImportError as error:  # also a transformers so old that it has no masking_utils
        raise ImportError(f"{_MISSING} ({error})") from error
    if tuple(map(int, re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())) < (4, 54):
        raise ImportError(f"{_MISSING}: transformers {transformers.__version__} is too old; 4.54 is the first with "
                          "both AttentionMaskInterface (4.53) and set_attn_implementation")
    return transformers, masking_utils


# transformers.masking_utils, bound once outside any traced code: ``from transformers import ...`` inside
# a function that torch.compile traces breaks the graph on older torch (Dynamo 2.11 refuses to import
# from transformers' lazy module), so the mask function reads the module from here instead
_MASKING_UTILS = None


def _masking_utils():
    global _MASKING_UTILS
    if _MASKING_UTILS is None:
        _MASKING_UTILS = _transformers()[1]
    return _MASKING_UTILS


def register(backend: str = "auto", name: str = "portattn") -> str:
    """Register portattn under ``name`` in transformers' attention and mask registries; returns ``name``.

    ``backend`` is passed to every ``portattn.attention`` call (``"auto"``, ``"numba"``, ``"triton"``, ...);
    a backend that cannot run a layer's call raises its reasons rather than falling back.
    """
    transformers, masking_utils = _transformers()
    _masking_utils()
    dispatch.check_name(backend)

    @functools.wraps(attention_forward)
    def forward(*args, **kwargs):
        return attention_forward(*args, backend=backend, **kwargs)

    transformers.AttentionInterface.register(name, forward)
    masking_utils.AttentionMaskInterface.register(name, mask)
    return name


def mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset=0, kv_offset: int = 0,
         mask_function=None, attention_mask=None, local_size: int | None = None, allow_is_causal_skip: bool = True,
         allow_is_bidirectional_skip: bool = False, cache_position=None, config=None, **kwargs):
    """transformers' mask-interface function: None, a (B, Nk) key padding or a (B, 1, Nq, Nk) bool mask.

    Takes both signatures transformers has used: ``q_length``/``q_offset`` and, before them,
    ``cache_position``.
    """
    import torch

    mu = _masking_utils()
    mask_function = mask_function or mu.causal_mask_function
    given = dict(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                 attention_mask=attention_mask, local_size=local_size, config=config, **kwargs)
    if cache_position is not None:
        given["cache_position"] = cache_position
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    else:
        given.update(q_length=q_length, q_offset=q_offset)

    def full():
        return mu.sdpa_mask(**given, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, allow_torch_fix=False)

    tracing = _tracing(attention_mask)
    if tracing and (attention_mask is not None or isinstance(q_offset, torch.Tensor)):
        return full()  # no tensor's value may be read (the padding's, a static cache's offset), nor a tensor type made
    q_offset = int(q_offset)  # a tensor for static caches
    queries_last = q_offset - kv_offset == kv_length - q_length  # bottom-right alignment
    causal = mask_function is mu.causal_mask_function and local_size is None and allow_is_causal_skip and queries_last
    bidirectional = (mask_function is getattr(mu, "bidirectional_mask_function", None)  # transformers 4.57+
                     and local_size is None and allow_is_bidirectional_skip)
    if tracing:  # nothing padded: the plain patterns need no mask (the layers' kernels then run without one)
        return None if causal or bidirectional else full()
    device = kwargs.get("device") or (cache_position.device if cache_position is not None else "cpu")
    sliding = (local_size is not None and allow_is_causal_skip and queries_last
               and _is_sliding_causal(mask_function, local_size, config, device))
    if not (causal or bidirectional or sliding):
        return full()
    given = attention_mask is not None
    if not given:
        if not sliding:
            return None
        attention_mask = torch.ones(batch_size, kv_offset + kv_length, dtype=torch.bool, device=device)
    padding = attention_mask.to(torch.bool)  # (B, keys seen so far); keys past its end are padding
    if (missing := kv_offset + kv_length - padding.shape[-1]) > 0:
        padding = torch.nn.functional.pad(padding, (0, missing))
    padding = padding[:, kv_offset:kv_offset + kv_length]
    # one read of the mask per forward (not per layer): without padding, no key padding reaches the kernels,
    # so a decoding step takes the decode kernel and no layer reads a (B, Nk) mask
    padded = given and not bool(padding.all())
    if not sliding and not padded:
        return None
    pattern = _key_padding(causal=not bidirectional, window=local_size if sliding else None, padded=padded)
    return padding.contiguous().as_subclass(pattern)


@functools.cache
def _key_padding(causal: bool, window: int | None, padded: bool = True) -> type:
    """The type of a (B, Nk) bool key padding (True = a real key) that carries its layer's pattern:
    ``pattern = (causal, window)``, and ``padded``: False when every key is real (a sliding window's
    pattern still needs a mask to travel in). A class attribute of a torch.Tensor subclass goes wherever
    the mask goes, ``.to(device)`` included (an instance attribute would be lost there)."""
    import torch

    return type("KeyPadding", (torch.Tensor,), {"pattern": (causal, window), "padded": padded, "__module__": __name__})


def _tracing(tensor) -> bool:
    """Under torch.compile, export or jit tracing no value may be read (a mask's, a tensor offset's)."""
    import torch

    mu = _masking_utils()
    if hasattr(mu, "is_tracing"):
        return mu.is_tracing(tensor)
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _is_sliding_causal(mask_function, window: int, config, device) -> bool:
    """True when ``mask_function`` is transformers' sliding-window causal pattern of ``window`` keys, the
    one ``create_sliding_window_causal_mask`` makes of ``config.sliding_window``: key ``kv`` is seen from
    query ``q`` iff ``q - window < kv <= q``. Checked on two rows, so that a changed definition, or a
    chunked mask of the same size, is never taken for it."""
    import torch

    if window < 1 or getattr(config, "sliding_window", None) != window:
        return False
    rows = torch.arange(2 * window, 2 * window + 2, device=device)[:, None]
    keys = torch.arange(window - 1, 2 * window + 3, device=device)[None, :]
    index = torch.zeros((), dtype=torch.long, device=device)
    try:
        seen = mask_function(index, index, rows, keys)
    except (IndexError, RuntimeError, TypeError):  # an overlay indexing per-batch tensors: not this pattern
        return False
    return bool(torch.equal(seen.expand(2, keys.shape[1]).cpu(), ((keys > rows - window) & (keys <= rows)).cpu()))


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      *, backend: str = "auto", **kwargs):
    """transformers' attention-interface function, run by ``portattn.attention``.

    ``query`` (B, H, Nq, D) and ``key``/``value`` (B, H_kv, Nk, D), H_kv dividing H (GQA, never
    repeated); returns the output as (B, Nq, H, D) and ``None`` for the weights. The window comes
    from the mask, as SDPA's does: ``sliding_window`` is not read (some models, Qwen2-MoE's for one,
    do not pass it).
    """
    import torch

    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("portattn's transformers attention does not take 's_aux' (attention sinks); use "
                                  "attn_implementation='sdpa' or 'eager' for this model")
    if kwargs.get("output_attentions"):
        _warn_once("portattn does not return attention weights (output_attentions=True): they are None")
    bias = _score_bias(kwargs.get("position_bias"), key.shape[-2])
    features = {}
    if attention_mask is not None and attention_mask.ndim == 4:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if bias is not None:  # one additive mask: the bias where the mask lets a key through
            mask = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
        features["attn_mask"] = mask
    else:  # None or a (B, Nk) key padding: the layer's pattern rebuilt
        if bias is not None:
            features["attn_mask"] = bias
        causal, window = getattr(type(attention_mask), "pattern", (None, None))  # set by `mask`
        if causal is None:  # no mask (as SDPA, the layer says whether it is causal) or a plain key padding
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal:
            features.update(causal=True, align="bottom-right")
        if window is not None:
            features["window"] = (window - 1, 0)
        if attention_mask is not None and getattr(type(attention_mask), "padded", True):
            features["key_padding_mask"] = attention_mask.as_subclass(torch.Tensor).to(torch.bool)
    if dropout > 0.0 and getattr(module, "training", False):
        features.update(dropout_p=float(dropout), dropout_seed=int(torch.randint(2**31 - 1, ()).item()))
    if softcap is not None:
        features["softcap"] = float(softcap)
    head_dim, value_dim = query.shape[-1], value.shape[-1]
    if value_dim != head_dim:  # MLA (DeepSeek): a narrower or wider value head, zero-padded exactly as sdpa does
        width = max(head_dim, value_dim)
        scaling = head_dim ** -0.5 if scaling is None else scaling
        query, key, value = (pad_last(x, width) for x in (query, key, value))
    out = attention(query, key, value, scale=scaling, backend=backend, **features)
    if value_dim != head_dim:
        out = out[..., :value_dim]
    return out.transpose(1, 2).contiguous(), None


def _score_bias(position_bias, keys: int):
    """T5's ``position_bias`` -- (1 or B, H, Nq, Nk) floats added to the scores before the mask -- as an
    additive ``attn_mask``; None without one. Its gradient (training the relative bias) is not computed
    by portattn's kernels, so a bias that requires grad is refused rather than silently not trained."""
    if position_bias is None:
        return None
    import torch

    if position_bias.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("portattn's transformers attention cannot train a score bias (position_bias requires "
                                  "grad: T5's relative attention bias): its kernels give no gradient for it; use "
                                  "attn_implementation='sdpa' or 'eager' to train, portattn for inference")
    return position_bias[..., :keys]


@functools.cache
def _warn_once(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)
