"""The path a model takes on the CPU, portattn against torch's SDPA in one process: small calls through
``portattn.scaled_dot_product_attention`` and ``portattn.attention`` (plain and with a key padding or a
mask, as a padded batch's layers make them), a tiny Hugging Face Llama generating for a left-padded
batch, and the same model under ``torch.compile(fullgraph=True)``.

    python benchmarks/cpu_model_path.py --json benchmarks/results/cpu-model-path-<label>.json [--label after]

Run it with another tree first on PYTHONPATH to time that tree's portattn (the record names the file).
Small calls: median of 5 runs of 1000 back-to-back calls after 100 warm-up calls, us per call. Models: median
of 5 runs after warm-up, ms. Every figure's peer is timed in the same process; on a shared 2-core machine
absolute times drift by tens of percent from run to run, so compare the ratios. Never asserted in tests.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time


def per_call_us(fn, calls: int = 1000, runs: int = 5, warmup: int = 100) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def small_calls(torch, portattn) -> dict:
    sdpa, results = torch.nn.functional.scaled_dot_product_attention, {}
    for n in (16, 64, 128):
        q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
        results[f"prefill (1, 8, {n}, 64) causal"] = {
            "portattn sdpa": per_call_us(lambda: portattn.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "portattn attention": per_call_us(lambda: portattn.attention(q, k, v, causal=True)),
            "torch sdpa": per_call_us(lambda: sdpa(q, k, v, is_causal=True))}
    q, k, v = torch.randn(1, 32, 1, 128), torch.randn(1, 8, 512, 128), torch.randn(1, 8, 512, 128)
    results["decode (1, 32 / 8, 1 q, 512 k, 128)"] = {
        "portattn sdpa": per_call_us(lambda: portattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
        "torch sdpa": per_call_us(lambda: sdpa(q, k, v, enable_gqa=True))}
    # a left-padded batch's decoding step in a tiny Llama layer: 4 sequences, 8 / 2 heads, D 32, 40 keys
    q, k, v = torch.randn(4, 8, 1, 32), torch.randn(4, 2, 40, 32), torch.randn(4, 2, 40, 32)
    padding = torch.ones(4, 40, dtype=torch.bool)
    padding[1, :5] = padding[3, :9] = False
    results["padded decode step (4, 8 / 2, 1 q, 40 k, 32)"] = {
        "portattn key padding": per_call_us(lambda: portattn.attention(q, k, v, causal=True, align="bottom-right",
                                                                       key_padding_mask=padding)),
        "portattn 4-D mask": per_call_us(lambda: portattn.attention(q, k, v, attn_mask=padding[:, None, None, :])),
        "torch sdpa 4-D mask": per_call_us(lambda: sdpa(q, k, v, attn_mask=padding[:, None, None, :],
                                                        enable_gqa=True))}
    return results


def median_ms(fn, runs: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def models(torch) -> dict:
    import transformers

    from portattn.integrations import transformers as portattn_transformers

    portattn_transformers.register()
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    ids = torch.randint(1, 1000, (4, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = mask[3, :9] = 0
    prompt = ids[:1, :32]
    results = {"generate, left-padded batch of 4, 32 new tokens (ms per token)": {},
               "torch.compile(fullgraph=True) forward, 1 x 24 tokens, no mask (ms)": {},
               "same greedy tokens": None}
    tokens = {}
    for implementation in ("sdpa", "portattn"):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).eval()

        def generate():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                                  pad_token_id=0)

        tokens[implementation] = generate()[:, -32:].tolist()
        results["generate, left-padded batch of 4, 32 new tokens (ms per token)"][implementation] = (
            median_ms(generate, warmup=1) / 32)
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            results["torch.compile(fullgraph=True) forward, 1 x 24 tokens, no mask (ms)"][implementation] = (
                median_ms(lambda: compiled(prompt), runs=30, warmup=5))
    results["same greedy tokens"] = tokens["sdpa"] == tokens["portattn"]
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--label", default="this tree")
    args = parser.parse_args(argv)
    import numba
    import torch
    import transformers

    import portattn
    from cpu_numba_vs_torch import cpu_model  # this folder is on sys.path when the script runs

    record = {"label": args.label, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/cpu_model_path.py", *(argv or __import__("sys").argv[1:])]),
              "cpu": cpu_model(), "portattn_file": portattn.__file__,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "numba": numba.__version__},
              "small_calls_us": small_calls(torch, portattn), "models": models(torch)}
    text = json.dumps(record, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
