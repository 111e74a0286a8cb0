"""portattn inside Hugging Face transformers models: tiny random models built in code (no downloads),
run with ``attn_implementation`` set to portattn and to SDPA (eager where SDPA lacks the feature:
Gemma 2's softcapping) with the same weights, in float32 (and a Llama in bfloat16 against the float32 one).

A backend refusing a call (``backend '...' cannot run ...``, e.g. opencl's decoding or dropout) is an
xfail with that reason; any other error fails.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys

import pytest

torch = pytest.importorskip("torch", reason="the transformers integration needs torch")
transformers = pytest.importorskip("transformers", reason="the transformers integration needs transformers "
                                                          "(pip install 'portattn[transformers]')")

from transformers import masking_utils

from portattn.api import attention
from portattn.integrations import transformers as integration

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2,
            vocab_size=128)
REFUSED = re.compile(r"backend '\w+' cannot run")


@pytest.fixture(scope="module", params=["numba", "opencl"])
def name(request, usable_backend):
    usable_backend(request.param)
    return integration.register(backend=request.param, name=f"portattn-{request.param}")


def _refusals_xfail(run):
    """``run()``, with a backend's refusal turned into an xfail that gives its reasons."""
    try:
        return run()
    except ValueError as error:
        if REFUSED.search(str(error)):
            pytest.xfail(str(error))
        raise


def _needs_attention_interface(model_class):
    if not getattr(model_class, "_supports_attention_backend", False):
        pytest.skip(f"{model_class.__name__} does not use AttentionInterface in transformers {transformers.__version__}")


def _pair(model_class, config, name, reference="sdpa", from_config=False):
    """The same random weights twice: attention by ``reference`` and by portattn (``name``), set with
    ``set_attn_implementation`` or, with ``from_config``, given to ``from_config``."""
    _needs_attention_interface(model_class)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=reference).eval()
    if from_config:
        ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name)
    else:  # its own config: set_attn_implementation writes to it
        ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference)
        ours.set_attn_implementation(name)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    assert isinstance(ours, model_class)
    assert ours.config._attn_implementation == name and ref.config._attn_implementation == reference
    return ref, ours


def _batch(lengths, total, left=True, seed=1):
    """Token ids and the 0/1 attention mask of sequences of ``lengths``, padded to ``total``."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TINY["vocab_size"], (len(lengths), total), generator=generator)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, slice(total - length, None) if left else slice(0, length)] = 1
    return ids.masked_fill(mask == 0, 0), mask


def _labels(ids, mask):
    """Causal-LM labels that train on real tokens predicted from real tokens only: the model shifts them
    (the logits at t predict label t + 1), so a label right after padding -- predicted from the last
    padded position, whose query sees no key -- is left out too. That position's output is a convention
    (portattn and torch's CPU kernels give zeros; SDPA's fp16 CUDA kernels need not), not attention."""
    seen = mask.bool()
    after_real = torch.cat([torch.zeros_like(seen[:, :1]), seen[:, :-1]], dim=1)
    return ids.masked_fill(~(seen & after_real), -100)


def _close(ours, ref, where=None):
    if where is not None:
        ours, ref = ours[where], ref[where]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=2e-5)


def _same_gradients(ours, ref, rtol=1e-4, atol=1e-5):
    """Every parameter's gradient in ``ours`` equals the one in ``ref`` (same weights, same loss)."""
    grads = {key: p.grad for key, p in ref.named_parameters()}
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[key], rtol=rtol, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --- registration and the mask contract (no backend runs) ---

def test_register_fills_both_registries():
    name = integration.register(name="portattn-registry-test")
    assert name in transformers.AttentionInterface._global_mapping
    assert masking_utils.AttentionMaskInterface._global_mapping[name] is integration.mask
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        integration.register(backend="nope")


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'portattn[transformers]'")):
        integration.register()


def _dense(result, batch, q_length, kv_length, layer_is_causal):
    """What the attention function computes for a mask-function result, as a (B, 1, Nq, Nk) bool mask."""
    if result is not None and result.ndim == 4:
        return result.expand(batch, 1, q_length, kv_length)
    causal, window = getattr(type(result), "pattern", (layer_is_causal, None))
    position = torch.arange(q_length)[:, None] + kv_length - q_length  # bottom-right: the queries are the last
    key = torch.arange(kv_length)[None, :]
    seen = torch.ones(q_length, kv_length, dtype=torch.bool)
    if causal:
        seen &= key <= position
    if window is not None:
        seen &= key >= position - (window - 1)
    seen = seen.expand(batch, 1, q_length, kv_length)
    return seen & result[:, None, None, :] if result is not None else seen


SLIDING = masking_utils.sliding_window_causal_mask_function
CAUSAL = masking_utils.causal_mask_function
MASK_CASES = {
    # name: (mask_function, causal, window, q_length, kv_length, q_offset, kv_offset, padded, the result's form)
    "causal prefill": (CAUSAL, True, None, 6, 6, 0, 0, False, "None"),
    "causal left-padded": (CAUSAL, True, None, 6, 6, 0, 0, True, "padding"),
    "causal decode with a cache": (CAUSAL, True, None, 1, 9, 8, 0, True, "padding"),
    "causal chunk after a cache": (CAUSAL, True, None, 3, 9, 6, 0, True, "padding"),
    "static cache (keys past the queries)": (CAUSAL, True, None, 1, 16, 5, 0, True, "4-D"),
    "sliding prefill": (SLIDING(3), True, 3, 8, 8, 0, 0, True, "padding"),
    "sliding decode, window cache": (SLIDING(3), True, 3, 2, 4, 9, 7, False, "padding"),  # carries the window
}
try:
    CHUNKED = masking_utils.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
except TypeError:  # before transformers 4.56 it took no left padding
    CHUNKED = masking_utils.chunked_causal_mask_function(3)
MASK_CASES["chunked (as long as the window)"] = (CHUNKED, True, 3, 8, 8, 0, 0, True, "4-D")
if hasattr(masking_utils, "bidirectional_mask_function"):  # transformers 4.57+
    MASK_CASES["bidirectional"] = (masking_utils.bidirectional_mask_function, False, None, 5, 5, 0, 0, True, "padding")
    MASK_CASES["bidirectional sliding"] = (
        masking_utils.sliding_window_bidirectional_mask_function(2), False, 2, 6, 6, 0, 0, False, "4-D")


def _positions(q_length, q_offset):
    """The query positions as this transformers' mask functions take them (cache_position before 5.x)."""
    if "q_length" in inspect.signature(masking_utils.sdpa_mask).parameters:
        return dict(q_length=q_length, q_offset=q_offset)
    return dict(cache_position=torch.arange(q_offset, q_offset + q_length))


@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_function_means_what_sdpa_mask_means(case):
    function, causal, window, q_length, kv_length, q_offset, kv_offset, padded, form = MASK_CASES[case]
    padding = torch.ones(2, q_offset + q_length, dtype=torch.bool)  # one entry per token seen so far
    if padded:
        padding[1, :2] = False  # left padding of the second sequence
    arguments = dict(batch_size=2, **_positions(q_length, q_offset), kv_length=kv_length, kv_offset=kv_offset,
                     mask_function=function, attention_mask=padding, local_size=window if window else None,
                     allow_is_causal_skip=causal, allow_is_bidirectional_skip=not causal,
                     config=transformers.MistralConfig(sliding_window=window))
    result = integration.mask(**arguments)
    assert form == ("None" if result is None else "padding" if result.ndim == 2 else "4-D"), result
    expected = masking_utils.sdpa_mask(**{**arguments, "allow_is_causal_skip": False,
                                          "allow_is_bidirectional_skip": False})
    got = _dense(result, 2, q_length, kv_length, causal)
    assert torch.equal(got, expected.expand_as(got))
    if form == "padding":  # the pattern travels with the mask, through copies and device moves too
        assert type(result.clone()).pattern == type(result).pattern == (causal, window)
        # a mask of real keys only carries the pattern and no key padding (the decode kernel can take the call)
        assert type(result).padded == (not bool(result.as_subclass(torch.Tensor).all()))


@pytest.mark.parametrize("case", MASK_CASES)
@pytest.mark.parametrize("padding_given", [False, True])
def test_mask_function_while_traced_reads_no_value(case, padding_given, monkeypatch):
    """Under torch.compile no tensor value may be read: with no attention_mask given, the plain causal and
    bidirectional patterns still need no mask (so the compiled layers run the kernels without one, as SDPA's
    do); every other call gets transformers' own 4-D mask -- and means what sdpa_mask means either way."""
    function, causal, window, q_length, kv_length, q_offset, kv_offset, padded, form = MASK_CASES[case]
    padding = torch.ones(2, q_offset + q_length, dtype=torch.bool) if padding_given else None
    arguments = dict(batch_size=2, **_positions(q_length, q_offset), kv_length=kv_length, kv_offset=kv_offset,
                     mask_function=function, attention_mask=padding, local_size=window if window else None,
                     allow_is_causal_skip=causal, allow_is_bidirectional_skip=not causal,
                     config=transformers.MistralConfig(sliding_window=window))
    monkeypatch.setattr(integration, "_tracing", lambda tensor: True)
    result = integration.mask(**arguments)
    queries_last = q_offset - kv_offset == kv_length - q_length
    plain = not padding_given and window is None and form in ("None", "padding") and queries_last
    assert (result is None) == plain, result
    if result is not None:
        assert result.ndim == 4 and type(result) is torch.Tensor
    expected = masking_utils.sdpa_mask(**{**arguments, "allow_is_causal_skip": False,
                                          "allow_is_bidirectional_skip": False})
    got = _dense(result, 2, q_length, kv_length, causal)
    assert torch.equal(got, expected.expand_as(got))


# --- models ---

def test_bert_padded_batch_and_from_pretrained(name, tmp_path):
    config = transformers.BertConfig(**{k: v for k, v in TINY.items() if k != "num_key_value_heads"},
                                     max_position_embeddings=32)
    _needs_attention_interface(transformers.BertModel)
    torch.manual_seed(0)
    ref = transformers.BertModel(config, add_pooling_layer=False).eval()
    ref.save_pretrained(tmp_path)
    ours = transformers.BertModel.from_pretrained(tmp_path, attn_implementation=name, add_pooling_layer=False).eval()
    assert ours.config._attn_implementation == name and ref.config._attn_implementation == "sdpa"
    ids, mask = _batch([9, 5, 7], 9, left=False)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = _refusals_xfail(lambda: ours(input_ids=ids, attention_mask=mask).last_hidden_state)
    _close(got, want)  # padded queries still see the real keys: every position is meaningful


def test_t5_relative_bias_in_inference_and_refused_in_training(name, monkeypatch):
    """T5 hands its relative position bias to the attention function (``position_bias``, added to the
    scores before the mask): portattn takes it as an additive mask, in the encoder, the causal decoder and
    the cross attention, and generates as SDPA does. Training would need the bias's gradient, which the
    kernels do not give: refused with the reason, never a silently untrained bias."""
    config = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=TINY["vocab_size"],
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    ref = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa").eval()
    try:  # T5 calls the attention interface without declaring _supports_attention_backend
        ours = transformers.AutoModelForSeq2SeqLM.from_config(copy.deepcopy(config), attn_implementation=name)
    except ValueError as error:  # an older transformers that gates T5 off the interface; any other error fails
        if "does not support" not in str(error):
            raise
        pytest.skip(f"T5 takes no registered attention in transformers {transformers.__version__}: {error}")
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    calls = []
    monkeypatch.setattr(integration, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    ids, mask = _batch([9, 6], 9, left=False)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits
        got = _refusals_xfail(lambda: ours(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits)
        assert len(calls) == 3 * config.num_layers  # encoder, decoder and cross attention: all through portattn
        _close(got, want)
        options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours.generate(ids, **options), ref.generate(ids, **options))
    ours.train()
    with pytest.raises(NotImplementedError, match="cannot train a score bias"):
        ours(input_ids=ids, attention_mask=mask, labels=ids[:, :5].contiguous()).loss.backward()


def test_mla_value_head_narrower_than_query_head(name):
    """DeepSeek's multi-head latent attention gives the attention function a value head (8) narrower than
    the query/key head (24): zero-padded to one head dim, the scale kept at the query's, the output cut
    back -- left-padded logits, greedy generation and the parameters' gradients as SDPA's."""
    model_class = getattr(transformers, "DeepseekV3ForCausalLM", None)
    if model_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no DeepSeek-V3")
    config = transformers.AutoConfig.for_model(
        "deepseek_v3", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=TINY["vocab_size"], q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, max_position_embeddings=64)
    ref, ours = _pair(model_class, config, name)
    ids, mask = _batch([9, 6], 9)
    _close(_refusals_xfail(lambda: _logits(ours, ids, mask)), _logits(ref, ids, mask), mask.bool())
    options = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **options), ref.generate(ids, **options))
    labels = _labels(ids, mask)
    ref.train(), ours.train()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    _same_gradients(ours, ref)


def test_llama_gqa_left_padded_logits(name):
    ref, ours = _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY), name)
    ids, mask = _batch([10, 6, 3], 10)
    got = _refusals_xfail(lambda: _logits(ours, ids, mask))
    _close(got, _logits(ref, ids, mask), mask.bool())  # padded queries see no key: not compared


@pytest.mark.parametrize("cache", ["dynamic", "static"])  # static: keys past the queries, so a 4-D mask
def test_llama_greedy_generate_with_kv_cache(name, cache):
    ref, ours = _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY), name)
    ids, mask = _batch([10, 6], 10)
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation=cache)
    got = _refusals_xfail(lambda: ours.generate(ids, **options))
    assert torch.equal(got, ref.generate(ids, **options))


def test_llama_training_gradients(name):
    ref, ours = _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY), name)
    ids, mask = _batch([8, 5], 8)
    labels = _labels(ids, mask)
    ref.train(), ours.train()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    _refusals_xfail(lambda: ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward())
    _same_gradients(ours, ref)


def test_llama_bfloat16_is_as_close_to_float32_as_sdpa_in_bfloat16(name):
    """A bfloat16 model (as CPUs with bf16 instructions run them; numba multiplies bf16 tiles in bf16 there):
    logits of a left-padded batch and a training step's attention gradients are as close to the float32
    model's as SDPA's own bfloat16 run is."""
    ref, ours = _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY), name)
    exact = copy.deepcopy(ref)
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids, mask = _batch([40, 23, 9], 40)
    seen = mask.bool()
    want = _logits(exact, ids, mask)
    got = _refusals_xfail(lambda: _logits(ours, ids, mask))
    ours_error, sdpa_error = ((x.float() - want)[seen].abs().max().item() for x in (got, _logits(ref, ids, mask)))
    assert ours_error <= 2 * sdpa_error + 1e-2, (ours_error, sdpa_error)
    labels = _labels(ids, mask)
    for model in (exact, ref, ours):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = [dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"].grad.float() for model in (exact, ref, ours)]
    ours_error, sdpa_error = ((g - grads[0]).abs().max().item() for g in (grads[2], grads[1]))
    assert ours_error <= 2 * sdpa_error + 1e-3 * grads[0].abs().max().item(), (ours_error, sdpa_error)


def test_llama_compiles_fullgraph_forward_and_backward(name):
    """torch.compile(model, fullgraph=True) of a Llama with portattn inside: no graph break, the same
    logits on a left-padded batch and the same parameter gradients as SDPA."""
    if not name.endswith("numba"):
        pytest.skip("one CPU backend is enough to show the compiled model; the op is backend-neutral")
    ref, ours = _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY), name)
    ids, mask = _batch([8, 5], 8)
    compiled = torch.compile(ours, fullgraph=True)
    _close(_logits(compiled, ids, mask), _logits(ref, ids, mask), where=mask.bool())
    labels = _labels(ids, mask)
    ref.train(), ours.train()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    compiled(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    _same_gradients(ours, ref)


def test_llama_attention_dropout_in_training_only(name):
    config = transformers.LlamaConfig(**TINY, attention_dropout=0.5)
    ref, ours = _pair(transformers.LlamaForCausalLM, config, name)
    ids, mask = _batch([8, 8], 8)
    ours.train()

    def dropped(seed):
        torch.manual_seed(seed)  # the dropout seed is drawn from torch's generator
        return _logits(ours, ids, mask)

    first = _refusals_xfail(lambda: dropped(3))
    assert torch.equal(first, dropped(3)) and not torch.equal(first, dropped(4))
    ours.eval()
    _close(_logits(ours, ids, mask), _logits(ref, ids, mask))


def test_mistral_sliding_window(name):
    config = transformers.MistralConfig(**TINY, sliding_window=4)
    ref, ours = _pair(transformers.MistralForCausalLM, config, name)
    ids, mask = _batch([12, 7], 12)
    got = _refusals_xfail(lambda: _logits(ours, ids, mask))
    _close(got, _logits(ref, ids, mask), mask.bool())
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)  # decoding past the window
    assert torch.equal(_refusals_xfail(lambda: ours.generate(ids, **options)), ref.generate(ids, **options))


def test_gemma2_softcap_and_sliding_layers(name):
    config = transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=4, attn_logit_softcapping=2.0,
                                       query_pre_attn_scalar=8)
    assert config.layer_types == ["sliding_attention", "full_attention"]
    # eager: sdpa has no softcap
    ref, ours = _pair(transformers.Gemma2ForCausalLM, config, name, reference="eager", from_config=True)
    ids, mask = _batch([11, 6], 11)
    got = _refusals_xfail(lambda: _logits(ours, ids, mask))
    _close(got, _logits(ref, ids, mask), mask.bool())


def test_qwen2_moe_sliding_layers_that_do_not_pass_sliding_window(name):
    # Qwen2-MoE's sliding layers give the attention function no `sliding_window`: the window must come from the mask
    config = transformers.Qwen2MoeConfig(**TINY, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                         num_experts=4, num_experts_per_tok=2, use_sliding_window=True,
                                         sliding_window=4, max_window_layers=2)
    if "sliding_attention" not in (getattr(config, "layer_types", None) or ()):
        pytest.skip(f"Qwen2-MoE has no sliding layers in transformers {transformers.__version__}")
    ref, ours = _pair(transformers.Qwen2MoeForCausalLM, config, name)
    ids, mask = _batch([12, 7], 12)
    got = _refusals_xfail(lambda: _logits(ours, ids, mask))
    _close(got, _logits(ref, ids, mask), mask.bool())


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_llama_on_a_gpu(usable_backend, backend):
    """The GPU backends in a real model: left-padded logits, greedy generation with a KV cache and
    parameter gradients against SDPA, on CUDA (triton in float32 IEEE products; cupy in float16,
    its narrowest dtype, against SDPA in float16)."""
    usable_backend(backend)
    if not torch.cuda.is_available():
        pytest.skip(f"{backend} in a model needs a CUDA device (numba and opencl cover the CPU)")
    dtype = torch.float32 if backend == "triton" else torch.float16
    name = integration.register(backend=backend, name=f"portattn-{backend}")
    ref, ours = _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY), name)
    ref, ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
    ids, mask = (x.cuda() for x in _batch([8, 5], 8))
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(_logits(ours, ids, mask)[mask.bool()], _logits(ref, ids, mask)[mask.bool()], **tol)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    if dtype == torch.float32:
        assert torch.equal(ours.generate(ids, attention_mask=mask, **options), ref.generate(ids, attention_mask=mask, **options))
    labels = _labels(ids, mask)
    ref.train(), ours.train()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    _same_gradients(ours, ref, **({"rtol": 1e-3, "atol": 1e-4} if dtype == torch.float32 else tol))
