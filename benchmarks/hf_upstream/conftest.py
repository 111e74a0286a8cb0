"""Run transformers' own model tests with portattn as the attention implementation.

transformers' test suites (``tests/test_modeling_common.py``, ``tests/generation/test_utils.py``,
``tests/models/<model>/test_modeling_<model>.py``) build every model with the default attention, SDPA.
This conftest, copied to the root of a scratch folder that holds those tests, registers portattn and
makes every model that would get SDPA get portattn instead -- the default (no ``attn_implementation``)
and an explicit ``attn_implementation="sdpa"`` alike. So the suites run their checks on portattn, and
their comparisons of attention implementations compare portattn with eager:
``test_eager_matches_sdpa_inference`` (eager against portattn, padded and not, fp32/fp16/bf16),
``test_left_padding_compatibility``, ``test_sdpa_padding_matches_padding_free_with_position_ids`` and
the generation tests (greedy, beam, static cache, continuing from a cache). Models whose default is eager
because SDPA lacks a feature (Gemma 2's softcapping) are routed too, and claim SDPA support so that these
tests run for them.

Checks added to every model's test class (the suites have them only for flash attention, behind its
package and a GPU, or marked slow): ``test_portattn_inference_equivalence[_right_padding]`` (bf16, padded,
against eager), ``test_eager_matches_portattn_generate`` (fp16 greedy generation with a cache),
``test_portattn_padding_matches_padding_free_with_flash_kwargs`` (packed sequences with flash
attention's ``cu_seq_lens`` kwargs) and ``test_portattn_gradients_match_eager`` (float32 training step,
left padding, every parameter's gradient).

It is inert anywhere else (it acts only where ``tests/test_modeling_common.py`` lies beside it), so
``pytest benchmarks`` in portattn's repository does not touch transformers.

Setup (no network on the GPU machines: assemble the folder where there is one, carry it there)::

    mkdir -p /work/hf-tests && cd /work/hf-tests
    # 1. tests/ from the transformers sdist matching the installed version: it carries test_modeling_common.py,
    #    test_configuration_common.py, test_pipeline_mixin.py, ... but no tests/models or tests/generation
    pip download --no-deps --no-binary :all: "transformers==$(python -c 'import transformers as t; print(t.__version__)')"
    tar xzf transformers-*.tar.gz --strip-components=1 --wildcards '*/tests/*'
    # 2. from a transformers git checkout (the closest version to hand; 5.3.0.dev0 was used with 5.25):
    #    tests/{__init__,causal_lm_tester}.py, tests/generation/, tests/utils/{__init__.py,tiny_model_summary.json},
    #    tests/models/{__init__.py,llama,mistral,gemma2,bert,qwen2,gemma3,gpt2,qwen2_moe,modernbert,gpt_neox}/
    #    -- copied without overwriting step 1's files
    # 3. stubs for what step 1 imports but neither source has, or what pulls in httpx/hub:
    #    tests/exporters/{__init__.py,test_export.py} with ``class ExportTesterMixin: pass``, and
    #    tests/utils/test_configuration_utils.py reduced to its ``config_common_kwargs`` dict
    # 4. test_pipeline_mixin.py imports ``src/transformers``: ln -s <site-packages>/transformers src/transformers
    # 5. this file as /work/hf-tests/conftest.py; ``pip install parameterized`` (e.g. --target, on PYTHONPATH)

Run (``PORTATTN_HF_BACKEND``: numba, auto, triton, cuda, ...; default auto; ``off`` runs the same
selection on transformers' own SDPA, the baseline that tells a portattn failure from a test that
does not fit the installed transformers)::

    cd /work/hf-tests
    PORTATTN_HF_BACKEND=numba PYTHONPATH=.:/path/to/portattn python -m pytest -p no:cacheprovider -q \\
        tests/models/llama/test_modeling_llama.py -k "sdpa or padding or generate or attention"

``PORTATTN_HF_KEEP_SDPA=1`` leaves explicit ``attn_implementation="sdpa"`` requests alone (only the
default becomes portattn): ``test_eager_matches_sdpa_inference`` is then transformers' own eager-vs-SDPA
check, and ``test_can_set_attention_dynamically`` (it asserts ``_attn_implementation == "sdpa"`` after
asking for it) passes. Without it, that test and ``test_sdpa_can_dispatch_non_composite_models`` (it
asserts the default is "sdpa", so it fails in both modes) fail by design.

Failures that are not portattn's (they fail the same with ``PORTATTN_HF_BACKEND=off``), with transformers
5.25 and the 5.3.0.dev0 model/generation tests: ``test_assisted_decoding_*`` (``cache_implementation=
"dynamic_full"`` is gone; they run eager anyway), ``test_generate_compilation_all_outputs``
(``StaticCache.get_max_cache_shape`` is gone), Gemma 3's RoPE-scaling and hub tests, and GPT-NeoX's
``test_cached_forward_with_and_without_attention_mask`` (asserts "sdpa"; it passes on portattn once the
assertion allows it).

At the end the session says how many layer calls portattn ran, and ``PORTATTN_HF_SKIP`` (a regular
expression on test ids; a default list below) deselects tests that do not concern attention or cannot
run here (hub downloads, multi-device, DeepSpeed, quantization, flash-attn and flex-attention tests).
``pip install accelerate`` (with psutil) lets the tests that load with ``device_map`` run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

NAME = "portattn"
ACTIVE = (Path(__file__).parent / "tests" / "test_modeling_common.py").exists()
# not attention, or not runnable without the hub, several devices, DeepSpeed, bitsandbytes or flash-attn
DEFAULT_SKIP = (r"pipeline|hub|push_to|from_pretrained_no_checkpoint|"
                r"model_parallel|multi_gpu|offload|disk|cpu_offload|tp_plan|tensor_parallel|"
                r"bnb|bitsandbytes|quantiz|deepspeed|fsdp|test_kernels_|flash_attn|flex_attention|"
                r"integration|IntegrationTest|slow")
CALLS = {"layers": 0}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# triton's kernels in its interpreter on a CPU machine. Set on import, before anything imports triton:
# triton reads it once, and jit functions made before it is set run compiled inside interpreted kernels
if ACTIVE and not os.environ.get("TRITON_INTERPRET") and not _has_cuda():
    os.environ["TRITON_INTERPRET"] = "1"


def _backend() -> str:
    return os.environ.get("PORTATTN_HF_BACKEND", "auto")


def _register() -> None:
    """portattn registered under NAME, with a counter so the session can show it ran."""
    import torch
    from transformers import AttentionInterface

    from portattn.integrations import transformers as integration

    integration.register(backend=_backend(), name=NAME)
    forward = AttentionInterface._global_mapping[NAME]

    def counted(*args, **kwargs):
        if not torch.compiler.is_compiling():  # a traced counter is a guard: each call would recompile
            CALLS["layers"] += 1
        return forward(*args, **kwargs)

    AttentionInterface.register(NAME, counted)


def _route_sdpa_to_portattn() -> None:
    """Every model that would get SDPA gets portattn: transformers resolves the default (None) and
    ``"sdpa"`` in ``get_correct_attn_implementation``. Models whose default is eager because SDPA lacks a
    feature (Gemma 2's softcapping) get portattn too, which has it. Models that do not go through
    AttentionInterface (``_supports_attention_backend`` False) keep transformers' choice: portattn cannot
    replace their attention."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.get_correct_attn_implementation

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        if _routed(type(self), requested_attention):
            return NAME
        return original(self, requested_attention, is_init_check)

    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation


def _routed(model_class, requested) -> bool:
    if not getattr(model_class, "_supports_attention_backend", False):
        return False
    return requested is None or (requested == "sdpa" and os.environ.get("PORTATTN_HF_KEEP_SDPA") != "1")


def _claim_sdpa_support() -> None:
    """``_supports_sdpa = True`` on the loaded model classes that portattn serves, so that the suites'
    SDPA tests (skipped for classes without it: Gemma 2) run -- on portattn, since "sdpa" is routed to it."""
    from transformers import PreTrainedModel

    seen, stack = set(), [PreTrainedModel]
    while stack:
        for subclass in stack.pop().__subclasses__():
            if subclass not in seen:
                seen.add(subclass)
                stack.append(subclass)
    for model_class in seen:
        if _routed(model_class, "sdpa") and not model_class._supports_sdpa:
            model_class._supports_sdpa = True


def _shim_older_tests() -> None:
    """Tests older than the installed transformers read attributes it has since dropped: the 5.3 generation
    tests read ``PreTrainedModel._is_stateful`` (True only for recurrent-state models, none of those run here)."""
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "_is_stateful"):
        PreTrainedModel._is_stateful = False


def _add_portattn_tests() -> None:
    """The suites' checks of other implementations against eager, pointed at portattn: they are written
    for flash attention (decorated to need its package and a GPU) or marked slow. Added to the mixins
    before the test modules are collected, so every model's test class inherits them."""
    from tests.generation.test_utils import GenerationTesterMixin
    from tests.test_modeling_common import ModelTesterMixin

    ModelTesterMixin.test_portattn_inference_equivalence = _inference_equivalence("left")
    ModelTesterMixin.test_portattn_inference_equivalence_right_padding = _inference_equivalence("right")
    ModelTesterMixin.test_portattn_gradients_match_eager = _gradients_match_eager
    GenerationTesterMixin.test_eager_matches_portattn_generate = _eager_matches_generate
    GenerationTesterMixin.test_portattn_padding_matches_padding_free_with_flash_kwargs = _padding_free_with_flash_kwargs


def _inference_equivalence(padding_side: str):
    """``flash_attn_inference_equivalence`` (bf16, padded on one side, against eager) with portattn. It
    runs only classes that claim flash attention; portattn needs no such claim."""
    def test(self):
        with _claiming_flash(self.all_model_classes):
            self.flash_attn_inference_equivalence(attn_implementation=NAME, padding_side=padding_side)

    return test


def _claiming_flash(model_classes):
    from contextlib import ExitStack
    from unittest import mock

    stack = ExitStack()
    for model_class in model_classes:
        stack.enter_context(mock.patch.object(model_class, "_supports_flash_attn", True))
    return stack


def _eager_matches_generate(self):
    """``test_eager_matches_sdpa_generate`` (marked slow): greedy fp16 generation with a cache, eager against
    "sdpa" -- portattn here."""
    if os.environ.get("PORTATTN_HF_KEEP_SDPA") == "1":
        self.skipTest("PORTATTN_HF_KEEP_SDPA=1: 'sdpa' is SDPA")
    self._test_attention_implementation("sdpa")


def _padding_free_with_flash_kwargs(self):
    """Packed sequences given as flash attention's ``cu_seq_lens_*``/``max_length_*`` kwargs (with
    position_ids): the mask comes from the position ids; the extra kwargs must not disturb portattn."""
    if os.environ.get("PORTATTN_HF_KEEP_SDPA") == "1":
        self.skipTest("PORTATTN_HF_KEEP_SDPA=1: 'sdpa' is SDPA")
    self.attention_mask_padding_matches_padding_free_with_position_ids(attn_implementation="sdpa", fa_kwargs=True)


def _gradients_match_eager(self):
    """Training in float32 without dropout, a batch with left padding: every parameter's gradient with
    portattn matches eager's (no suite compares gradients across attention implementations)."""
    import torch
    from transformers.testing_utils import set_config_for_less_flaky_test, torch_device

    if not self.has_attentions:
        self.skipTest("no attention")
    for model_class in self.all_model_classes:
        if not getattr(model_class, "_supports_attention_backend", False):
            continue
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        set_config_for_less_flaky_test(config)
        for key, value in config.to_dict().items():  # attention_dropout, hidden_dropout_prob, attn_pdrop, ...
            if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
                setattr(config, key, 0.0)
        inputs = {k: v.to(torch_device) for k, v in self._prepare_for_class(inputs, model_class).items()
                  if isinstance(v, torch.Tensor)}
        if inputs["input_ids"].ndim != 2:  # multiple choice: (B, choices, N)
            continue
        if "attention_mask" in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
            inputs["attention_mask"][-1, :2] = 0  # the last sequence left-padded
        grads = [_gradients(model_class, config, inputs, impl) for impl in ("eager", NAME)]
        for name, eager in grads[0].items():
            torch.testing.assert_close(grads[1][name], eager, atol=1e-5, rtol=1e-4, msg=lambda m: f"{model_class.__name__} {name}: {m}")


def _gradients(model_class, config, inputs, attn_implementation):
    import torch
    from transformers.testing_utils import torch_device

    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation=attn_implementation).to(torch_device).train()
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out[0]
    real = inputs.get("attention_mask", torch.ones(hidden.shape[:2], device=hidden.device)).bool()
    hidden[real].float().square().mean().backward()  # padded positions' outputs are arbitrary: not in the loss
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def pytest_configure(config):
    if not ACTIVE:
        return
    _shim_older_tests()
    if _backend() == "off":
        return
    _register()
    _route_sdpa_to_portattn()
    _add_portattn_tests()


def pytest_collection_modifyitems(config, items):
    if not ACTIVE:
        return
    if _backend() != "off":
        _claim_sdpa_support()  # the test modules, and so their model classes, are imported by now
    skip = re.compile(os.environ.get("PORTATTN_HF_SKIP", DEFAULT_SKIP))
    kept = [item for item in items if not skip.search(item.nodeid)]
    config.hook.pytest_deselected(items=[item for item in items if skip.search(item.nodeid)])
    items[:] = kept


def pytest_terminal_summary(terminalreporter):
    if ACTIVE:
        terminalreporter.write_line(f"portattn (backend {_backend()!r}) ran {CALLS['layers']} attention layer calls")
