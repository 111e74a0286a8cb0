"""A Hugging Face model end to end, portattn against SDPA: prefill time and greedy generation time per token.

    python benchmarks/hf_generate.py --json benchmarks/results/h200-hf-generate.json
    python benchmarks/hf_generate.py --device cpu --layers 2 --new-tokens 16      # the CPU backends
    python benchmarks/hf_generate.py --smoke                                       # tiny: checks the script

A Llama of random weights (no download): ``--layers`` layers of hidden 2048, 16 query heads and 4 KV
heads of 128 (GQA), fp16 on a GPU (float32 on the CPU). For each attention implementation, in one process
on one device: the prefill of a ``--batch`` x ``--prompt`` batch (a forward with ``use_cache``), and
``generate`` of ``--new-tokens`` greedy tokens after it (a DynamicCache: every step is one query per
sequence against a cache one key longer than the last step's, the path that meets a new shape each
step). Medians of ``--reps`` after a warm-up, host wall clock around the device's synchronization. The
generated tokens of each implementation are compared with SDPA's (the share that agree is reported:
random weights make near-ties, so once one token differs on fp16 the rest follow another path: the first
differing step and the prefill's last logits against SDPA's say how close the two are). ``--profile PATH`` writes
cProfile's view of one portattn generation. Writes JSON with the device, versions, date and command.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import platform
import pstats
import statistics
import sys
import time


def model_and_prompt(args, torch, transformers):
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=args.prompt + args.new_tokens + 8,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    model = transformers.LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    prompt = torch.randint(3, args.vocab, (args.batch, args.prompt), device=args.device)
    return model, prompt


def timed(fn, sync, reps: int) -> tuple[float, object]:
    result = fn()  # warm-up: compiles kernels, fills caches
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    parser.add_argument("--backends", nargs="+", default=["auto"], help="portattn backends to time (default: auto)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU, one rep")
    parser.add_argument("--profile", metavar="PATH")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch
    import transformers

    import portattn
    from portattn.integrations import transformers as integration

    if args.smoke:
        args.device, args.layers, args.hidden, args.heads, args.kv_heads, args.vocab = "cpu", 1, 64, 4, 2, 128
        args.prompt, args.new_tokens, args.reps = 9, 4, 1
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model, prompt = model_and_prompt(args, torch, transformers)
    implementations = {"sdpa": "sdpa"}
    for backend in args.backends:
        implementations[f"portattn-{backend}"] = integration.register(backend=backend, name=f"portattn-{backend}")
    record = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
              "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "portattn": portattn.__version__, "python": platform.python_version()},
              "model": {name: getattr(args, name) for name in ("layers", "hidden", "heads", "kv_heads", "vocab")},
              "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens, "results": {}}
    tokens, logits = {}, {}
    for label, implementation in implementations.items():
        model.set_attn_implementation(implementation)
        with torch.inference_mode():
            prefill_s, prefilled = timed(lambda: model(prompt, use_cache=True), sync, args.reps)
            generate_s, out = timed(lambda: model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                                         do_sample=False), sync, args.reps)
        tokens[label] = out[:, args.prompt:]
        logits[label] = prefilled.logits[:, -1].float()
        agree = (tokens[label] == tokens["sdpa"]).all(dim=0)
        row = {"prefill_ms": prefill_s * 1e3, "generate_ms": generate_s * 1e3,
               "ms_per_new_token": (generate_s - prefill_s) / max(1, args.new_tokens - 1) * 1e3,
               "tokens_agreeing_with_sdpa": float((tokens[label] == tokens["sdpa"]).float().mean()),
               "first_token_differing_from_sdpa": None if bool(agree.all()) else int((~agree).nonzero()[0, 0]),
               "last_prefill_logits_max_abs_diff_to_sdpa": float((logits[label] - logits["sdpa"]).abs().max()),
               "last_prefill_logits_max_abs": float(logits[label].abs().max())}
        record["results"][label] = row
        print(label, json.dumps(row), flush=True)
    base = record["results"]["sdpa"]
    for label, row in record["results"].items():
        row["per_token_ratio_to_sdpa"] = row["ms_per_new_token"] / base["ms_per_new_token"]
        row["prefill_ratio_to_sdpa"] = row["prefill_ms"] / base["prefill_ms"]
    if args.profile:
        model.set_attn_implementation(implementations[f"portattn-{args.backends[0]}"])
        profiler = cProfile.Profile()
        with torch.inference_mode():
            profiler.enable()
            model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
            sync()
            profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
        for label, implementation in implementations.items():  # the CUDA API calls and kernels of each, side by side
            text.write(f"\n===== {label}: torch.profiler of generate({min(16, args.new_tokens)} tokens) =====\n")
            text.write(_device_table(torch, model, implementation, prompt, min(16, args.new_tokens), sync))
        with open(args.profile, "w") as f:
            f.write(text.getvalue())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def _device_table(torch, model, implementation, prompt, new_tokens: int, sync) -> str:
    """torch.profiler's table (by self CPU time) of one generate: synchronizations, copies, launches, kernels."""
    model.set_attn_implementation(implementation)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        sync()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


if __name__ == "__main__":
    main()
