"""The Hopper forward's configurations (portattn/backends/triton/hopper.py) swept on the flash-attention grid,
against portattn's triton forward and SDPA's cuDNN and flash kernels, every ratio taken in one process.

    export PYTHONPATH=$PWD
    python benchmarks/hopper_forward.py --json benchmarks/results/h100-hopper-forward.json   # on the GPU, ~4 min
    python benchmarks/hopper_forward.py --quick --json quick.json     # 3 tiles per head dim instead of 24
    python benchmarks/hopper_forward.py --compile-only --json c.json  # no GPU needed: shared memory, registers
    python benchmarks/hopper_forward.py --smoke                       # no GPU needed: the plumbing, interpreted

Grid (flash-attention's benchmark): batch * N = 16384, hidden 2048 (H = 2048 / D), D 64 and 128 at N 1024,
4096, 16384, and D 256 at (B, H, N) = (4, 8, 4096); causal and not; float16. FLOPs 4 * B * H * N^2 * D,
halved when causal.

1. Compile: every (head dim, causal, configuration) is compiled for the GPU's target in ``--workers``
   processes that need no GPU: ``triton.compile`` on the arguments bound as Triton's JIT binds them, so the
   JIT of the timing process finds each kernel in Triton's on-disk cache. Recorded per configuration:
   compile seconds, shared memory, registers and spill stack (cuobjdump), or the error; one that needs more
   shared memory than the device has is marked so; one whose PTX equals another's is timed once (Triton 3.6
   on sm_90: ``warp_specialize`` changes nothing at 8 warps, and its Hopper pass fails at 4).
   A worker the compiler kills (abort) is restarted; its configuration is recorded as crashed.
2. Time: per grid point every configuration that compiled is run once (its first call's seconds recorded at
   its first point), checked -- max |O - O_sdpa| (cuDNN's, else flash's) relative to max |O_sdpa|, and max
   |LSE - LSE_portattn| (the existing triton forward's) -- and timed with ``triton.testing.do_bench`` (rep
   ``--rep-all`` ms, median). Wrong ones are marked and never ranked. The ``--top`` fastest are re-timed
   at rep ``--rep-top`` ms next to ``portattn.attention(backend="triton")`` and SDPA cuDNN and flash.
   Past ``--max-minutes`` the remaining points are skipped (recorded), so the run ends in time.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback

TOKENS, HIDDEN = 16384, 2048
SEQLENS = (16384, 4096, 1024)
HEAD_DIMS = (128, 64)
WIDE = (4, 8, 4096, 256)  # D = 256: (B, H, N, D)
SM90_TARGET = ("cuda", 90, 32)
SM90_MAX_SHARED = 232448  # bytes of shared memory a block may opt into on sm_90 (227 KB)
WRONG_OUT = 2e-2  # relative to max |O_sdpa|: two correct float16 kernels differ by ~1e-3
WRONG_LSE = 1e-3  # a key tile too many or too few moves the LSE by >= log(1 + 64 / 16384) ~ 4e-3
VARIANTS = (  # the switches, each tried on a few anchor tiles (defer_pv on every tile)
    dict(loads="device"), dict(loads="pointer"), dict(lazy_rescale=8.0), dict(defer_pv=True, lazy_rescale=8.0),
    dict(defer_pv=True, loads="device"), dict(split_q=True), dict(split_q=True, lazy_rescale=8.0),
    dict(warp_specialize=True),
)
ANCHORS = {64: ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)),
           128: ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)),
           256: ((64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 3))}


# ----------------------------------------------------------------------------------------------
# the grid and the configurations


def points(args):
    """(B, H, N, D, causal) of every grid point, the headline (D = 128) first."""
    found = []
    for d in args.head_dims:
        if d == 256:
            b, h, n, _ = WIDE
            found += [(b, h, n, d, causal) for causal in args.causal]
        else:
            found += [(TOKENS // n, HIDDEN // d, n, d, causal) for n in args.seqlens for causal in args.causal]
    return found


def tiles(d):
    if d == 256:
        return [(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for s in (2, 3)]
    return [(bm, bn, w, s) for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)]


def configs(d, quick=False):
    """The configurations swept at head dim ``d``: every tile plain and with ``defer_pv``, and each variant
    switch on the anchor tiles (``--quick``: the anchors alone)."""
    from portattn.backends.triton.hopper import HopperConfig

    base = ANCHORS[d] if quick else tiles(d)
    found = [HopperConfig(*t) for t in base] + [HopperConfig(*t, defer_pv=True) for t in base]
    found += [HopperConfig(*t)._replace(**v) for t in ANCHORS[d] for v in VARIANTS]
    return list(dict.fromkeys(found))


def smoke_configs():
    from portattn.backends.triton.hopper import HopperConfig

    small = HopperConfig(block_m=32, block_n=16, num_warps=4, num_stages=2)
    return [small, small._replace(defer_pv=True), small._replace(loads="pointer", lazy_rescale=8.0),
            small._replace(split_q=True), small._replace(warp_specialize=True)]


# ----------------------------------------------------------------------------------------------
# 1. compile, in worker processes that need no GPU


def compile_like_jit(kernel, args, meta, target):
    """Compile ``kernel[grid](*args, **meta)`` for ``target`` as Triton's JIT would (same signature,
    specialization and options, hence the same on-disk cache entry), without a GPU. Uses the JIT's own
    binder and ``_pack_args`` (internal; the same in Triton 3.6 and 3.9)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(meta, debug=knobs.runtime.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(cubin: bytes) -> dict:
    """Registers and spill stack per thread from ``cuobjdump -res-usage`` (Triton bundles it)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return {"registers": int(found[1]), "stack": int(found[2]), "local": int(found[3])} if found else {}


def compile_one(job, target_spec) -> dict:
    """One configuration compiled for the target, on CPU tensors shaped as the grid's (the specialization
    follows the heads' and strides' divisibility by 16; the lengths and batch do not enter it)."""
    import torch
    from triton.backends.compiler import GPUTarget

    from portattn.backends.triton import hopper

    d, causal, heads, config = job
    q, k, v, out = (torch.empty(1, heads, 256, d, dtype=torch.float16) for _ in range(4))
    lse = torch.empty(1, heads, 256, dtype=torch.float32)
    kernel, _, args, meta = hopper.launch_arguments(q, k, v, out, lse, causal, d ** -0.5, config)
    start = time.perf_counter()
    compiled = compile_like_jit(kernel, args, meta, GPUTarget(*target_spec))
    seconds = time.perf_counter() - start
    ttgir = compiled.asm.get("ttgir", "")
    return {"ok": True, "compile_s": round(seconds, 2), "shared": compiled.metadata.shared,
            **resource_usage(compiled.asm["cubin"]), "ptx_sha": hashlib.sha1(compiled.asm["ptx"].encode()).hexdigest(),
            "warp_specialize_ops": ttgir.count("ttg.warp_specialize")}


def _worker(jobs, target_spec, results) -> None:
    """Compile ``jobs`` in order, sending each result through the pipe ``results`` as soon as it is known
    (a synchronous write: a compiler abort later loses nothing already sent)."""
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, even when the parent interprets (--smoke)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)  # the compiler's own messages (an MLIR reproducer: hundreds of lines) go here
        for index, job in jobs:
            log.seek(0)
            log.truncate()
            try:
                entry = compile_one(job, target_spec)
            except Exception as error:  # noqa: BLE001 - a configuration that does not compile is a result
                log.seek(0)
                said = [re.sub(r".*(Pipeline failed while executing \[`\w+`).*", r"\1]", line.strip()) for line in log
                        if any(mark in line for mark in ("UNREACHABLE", "Assertion", "Pipeline failed"))]
                entry = {"ok": False, "error": _first_line(error) + "".join(f" ({line[:200]})" for line in said[:2])}
            results.send((index, entry))


def precompile(jobs, workers: int, target_spec, timeout_s: float = 300.0) -> list[dict]:
    """``compile_one`` for every job in ``workers`` spawned processes, each reporting through a pipe. A
    process that dies (the compiler aborting) or spends more than ``timeout_s`` on one job is replaced; the
    job it was on -- the first of its jobs without a result -- is recorded as such."""
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")
    done: dict[int, dict] = {}
    running = {}  # pipe end -> [process, indices left in order, time of its last result]

    def start(indices):
        reader, writer = context.Pipe(duplex=False)
        process = context.Process(target=_worker, args=([(i, jobs[i]) for i in indices], target_spec, writer),
                                  daemon=True)
        process.start()
        writer.close()  # the child holds its own copy: this end reads EOF once the child is gone
        running[reader] = [process, list(indices), time.time()]

    def finish(reader, reason: str | None = None) -> None:
        process, left, _ = running.pop(reader)
        if reason is not None:
            process.kill()
        process.join()
        if left:  # it stopped before the end of its share
            done[left[0]] = {"ok": False, "error": reason or f"the compiler process died (exit code {process.exitcode})"}
            if left[1:]:
                start(left[1:])

    began = time.time()
    for share in range(min(workers, len(jobs))):
        start(range(share, len(jobs), workers))
    while running:
        for reader in wait(list(running), timeout=0.5):
            try:
                index, entry = reader.recv()
            except EOFError:
                finish(reader)
                continue
            state = running[reader]
            state[1].remove(index)
            state[2] = time.time()
            done[index] = entry
        for reader, (_, _, since) in list(running.items()):
            if time.time() - since > timeout_s:
                finish(reader, f"compile took over {timeout_s:.0f} s (killed)")
    print(f"compiled {len(jobs)} configurations in {time.time() - began:.0f} s with {workers} workers", flush=True)
    return [done.get(i, {"ok": False, "error": "no result"}) for i in range(len(jobs))]


def compile_grid(args, max_shared: int) -> dict:
    """{(d, causal, label): entry}: every configuration of every (d, causal) in the grid compiled, with
    ``fits`` (shared memory) and ``same_as`` (an earlier configuration with the same PTX)."""
    keys, jobs = [], []
    for d in args.head_dims:
        heads = WIDE[1] if d == 256 else (2 if args.smoke else HIDDEN // d)
        for causal in args.causal:
            for config in (smoke_configs() if args.smoke else configs(d, args.quick)):
                keys.append((d, causal, config))
                jobs.append((d, causal, heads, config))
    entries = precompile(jobs, args.workers, args.target)
    table = {}
    seen = {}
    for (d, causal, config), entry in zip(keys, entries):
        entry = {"D": d, "causal": causal, "config": config._asdict(), "label": config.label(), **entry}
        if entry["ok"]:
            entry["fits"] = entry["shared"] <= max_shared
            twin = seen.setdefault((d, causal, entry["ptx_sha"]), config.label())
            if twin != config.label():
                entry["same_as"] = twin
        table[(d, causal, config.label())] = (config, entry)
    return table


# ----------------------------------------------------------------------------------------------
# 2. time


def bench(fn, rep_ms: float, device: str) -> float:
    """Median milliseconds: do_bench on a GPU; the host clock over a few calls under the interpreter."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def sdpa(q, k, v, causal, kind):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[kind]
    with sdpa_kernel([chosen]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)


def peers(causal):
    """name -> forward callable, timed beside the best configurations."""
    import portattn

    return {"portattn-triton": lambda q, k, v: portattn.attention(q, k, v, causal=causal, backend="triton"),
            "sdpa-cudnn": lambda q, k, v: sdpa(q, k, v, causal, "cudnn"),
            "sdpa-flash": lambda q, k, v: sdpa(q, k, v, causal, "flash")}


def references(q, k, v, causal):
    """(O of SDPA -- cuDNN's, else flash's, else math's --, its name, the LSE of portattn's triton forward)."""
    import portattn

    out, name = None, None
    for kind in ("cudnn", "flash", "math"):
        try:
            out, name = sdpa(q, k, v, causal, kind), kind
            break
        except Exception:  # noqa: BLE001 - the next kernel serves as the reference
            continue
    _, lse = portattn.attention(q, k, v, causal=causal, backend="triton", return_lse=True)
    return out, name, lse


def time_point(point, table, args, first_calls) -> dict:
    import torch

    from portattn.backends.triton import hopper

    b, h, n, d, causal = point
    flops = 4 * b * h * n * n * d / (2 if causal else 1)
    tflops = lambda ms: flops / (ms * 1e-3) / 1e12  # noqa: E731
    gen = torch.Generator(device=args.device).manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, device=args.device, dtype=torch.float16) for _ in range(3))
    row = {"B": b, "H": h, "N": n, "D": d, "causal": causal, "flops": flops, "configs": [], "tflops": {}, "ms": {},
           "errors": {}}
    with torch.no_grad():
        ref_out, row["reference"], ref_lse = references(q, k, v, causal)
        scale = d ** -0.5
        for (dd, cc, label), (config, entry) in table.items():
            if dd != d or cc != causal:
                continue
            trial = {"label": label}
            if not entry["ok"]:
                trial["status"] = "compile failed: " + entry["error"]
            elif not entry["fits"]:
                trial["status"] = f"needs {entry['shared']} bytes of shared memory"
            elif "same_as" in entry:
                trial["status"] = f"same PTX as {entry['same_as']}"
            else:
                try:
                    run = lambda config=config: hopper.hopper_forward(q, k, v, causal, scale, config)  # noqa: E731
                    start = time.perf_counter()
                    out, lse = run()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    if (d, causal, label) not in first_calls:  # its kernel loaded (from Triton's cache) here
                        first_calls[(d, causal, label)] = trial["first_call_s"] = round(time.perf_counter() - start, 3)
                    trial["out_err"] = float((out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max())
                    trial["lse_err"] = float((lse - ref_lse).abs().max())
                    wrong = not (trial["out_err"] <= WRONG_OUT and trial["lse_err"] <= WRONG_LSE)
                    trial["ms"] = bench(run, args.rep_all, args.device)
                    trial["tflops"] = tflops(trial["ms"])
                    trial["status"] = "WRONG" if wrong else "ok"
                except Exception as error:  # noqa: BLE001 - a configuration that cannot run is a result
                    trial["status"] = "failed: " + _first_line(error)
                    if "CUDA error" in str(error) or "illegal" in str(error):
                        raise
            row["configs"].append(trial)
        ranked = sorted((t for t in row["configs"] if t["status"] == "ok"), key=lambda t: t["ms"])[:args.top]
        best = None
        for trial in ranked:
            config = table[(d, causal, trial["label"])][0]
            trial["ms_top"] = bench(lambda: hopper.hopper_forward(q, k, v, causal, scale, config), args.rep_top,
                                    args.device)
            if best is None or trial["ms_top"] < best["ms_top"]:
                best = trial
        if best is not None:
            row["best_config"] = best["label"]
            row["ms"]["hopper"] = best["ms_top"]
        for name, forward in peers(causal).items():
            try:
                row["ms"][name] = bench(lambda: forward(q, k, v), args.rep_top, args.device)
            except Exception as error:  # noqa: BLE001 - a peer that cannot run this shape is a result
                row["errors"][name] = _first_line(error)
    row["tflops"] = {name: tflops(ms) for name, ms in row["ms"].items()}
    cudnn = row["tflops"].get("sdpa-cudnn")
    row["ratio_to_cudnn"] = {name: t / cudnn for name, t in row["tflops"].items() if cudnn and name != "sdpa-cudnn"}
    row["counts"] = {status: sum(t["status"].startswith(status) for t in row["configs"])
                     for status in ("ok", "WRONG", "failed", "compile failed", "needs", "same PTX")}
    del q, k, v
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def host_times(table, args, calls: int = 200) -> dict:
    """Microseconds per call of back-to-back calls on a problem too small to keep the GPU busy (B 1,
    H = 2048 / D, N 128, the first head dim, not causal): the host's cost of a launch, for each load path
    (host descriptors are built and encoded per call, device ones cost an allocation) and the peers."""
    import torch

    from portattn.backends.triton import hopper

    d = args.head_dims[0]
    heads = 2 if args.smoke else WIDE[1] if d == 256 else HIDDEN // d
    gen = torch.Generator(device=args.device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, 128, d, generator=gen, device=args.device, dtype=torch.float16) for _ in range(3))
    plain = {}  # per load path, a configuration without switches: the first anchor tile where there is one
    anchor = ANCHORS[d][0]
    for (dd, causal, _), (config, entry) in sorted(table.items(), key=lambda item: tuple(item[1][0][:4]) != anchor):
        if dd == d and not causal and entry["ok"] and entry["fits"] and config == config._replace(
                warp_specialize=False, split_q=False, defer_pv=False, lazy_rescale=0.0):
            plain.setdefault(config.loads, config)
    contenders = {f"hopper-{loads}": (lambda config=config: hopper.hopper_forward(q, k, v, False, d ** -0.5, config))
                  for loads, config in plain.items()}
    contenders.update({name: (lambda forward=forward: forward(q, k, v)) for name, forward in peers(False).items()})
    found = {"D": d, "H": heads, "N": 128, "us_per_call": {}, "configs": {name[7:]: c.label() for name, c in
                                                                        ((f"hopper-{k}", c) for k, c in plain.items())}}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with torch.no_grad():
        for name, call in contenders.items():
            try:
                for _ in range(10):
                    call()
                sync()
                start = time.perf_counter()
                for _ in range(calls if args.device == "cuda" else 3):
                    call()
                sync()
                found["us_per_call"][name] = (time.perf_counter() - start) / (calls if args.device == "cuda" else 3) * 1e6
            except Exception as error:  # noqa: BLE001 - a peer that cannot run here is a result
                found["us_per_call"][name] = _first_line(error)
    return found


def _line(row) -> str:
    cells = " | ".join(f"{name} {t:.0f}" for name, t in row["tflops"].items())
    ratio = row["ratio_to_cudnn"].get("hopper")
    versus = f" ({ratio:.2f}x cuDNN)" if ratio else ""
    return (f"D={row['D']} causal={int(row['causal'])} N={row['N']}: best {row.get('best_config', '-')}{versus} | "
            f"{cells} TFLOP/s | {row['counts']}")


# ----------------------------------------------------------------------------------------------


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return (f"{type(error).__name__}: " + (lines[-1] if "PassManager" in text else lines[0] if lines else ""))[:300]


def _versions() -> dict:
    import torch
    import triton

    import portattn

    return {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "portattn": portattn.__version__}


def save(args, record) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--json", help="write the record here (rewritten after every grid point)")
    parser.add_argument("--quick", action="store_true", help="the anchor tiles only (with every variant)")
    parser.add_argument("--smoke", action="store_true",
                        help="no GPU: a tiny grid run under TRITON_INTERPRET=1, compiled for sm_90 in 2 workers")
    parser.add_argument("--compile-only", action="store_true", help="compile the grid's configurations and stop")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[*HEAD_DIMS, 256], choices=(64, 128, 256))
    parser.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS), help="for D 64 and 128")
    parser.add_argument("--causal", type=int, nargs="+", default=[0, 1], choices=(0, 1))
    parser.add_argument("--workers", type=int, default=12, help="compile processes")
    parser.add_argument("--top", type=int, default=3, help="configurations re-timed per point")
    parser.add_argument("--rep-all", type=float, default=20.0, help="do_bench rep (ms) for every configuration")
    parser.add_argument("--rep-top", type=float, default=100.0, help="do_bench rep (ms) for the best and the peers")
    parser.add_argument("--max-minutes", type=float, default=5.5, help="skip the points left after this long")
    args = parser.parse_args(argv)
    args.causal = [bool(c) for c in args.causal]
    if args.smoke:
        args.head_dims, args.seqlens, args.workers = [64], [48], min(args.workers, 2)
    return args


def main(argv=None):
    started = time.time()
    args = parse(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: triton.jit reads it then
    import torch

    gpu = torch.cuda.is_available() and not args.smoke
    args.device = "cuda" if gpu else "cpu"
    if gpu:
        import triton

        target = triton.runtime.driver.active.get_current_target()
        args.target = (target.backend, target.arch, target.warp_size)
        props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
        max_shared = props["max_shared_mem"]
    else:
        args.target, max_shared = SM90_TARGET, SM90_MAX_SHARED
    if not gpu and not (args.smoke or args.compile_only):
        sys.exit("no CUDA device: run with --smoke (interpreted) or --compile-only")
    record = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (TRITON_INTERPRET=1)" if args.smoke else "none",
              "target": list(args.target), "max_shared": max_shared, "versions": _versions(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "grid": "B*N = 16384, H = 2048/D (D 256: B 4, H 8, N 4096), fp16",
              "flops": "4*B*H*N^2*D, halved when causal",
              "timing": f"do_bench median: every configuration rep {args.rep_all} ms, the top {args.top} and the "
                        f"peers rep {args.rep_top} ms; L2 flushed by do_bench", "compile": [], "points": []}
    try:
        table = compile_grid(args, max_shared)
        record["compile"] = [entry for _, entry in table.values()]
        save(args, record)
        if args.compile_only:
            for entry in record["compile"]:
                print(_compile_line(entry))
            return record
        record["host_overhead"] = host_times(table, args)
        print("host time per call (us):", {name: round(us, 1) if isinstance(us, float) else us
                                            for name, us in record["host_overhead"]["us_per_call"].items()}, flush=True)
        save(args, record)
        first_calls: dict[tuple, float] = {}
        grid = points(args) if not args.smoke else [(1, 2, 48, 64, causal) for causal in args.causal]
        for point in grid:
            if time.time() - started > args.max_minutes * 60:
                record["points"].append({"B": point[0], "H": point[1], "N": point[2], "D": point[3], "causal": point[4],
                                         "skipped": f"past --max-minutes {args.max_minutes}"})
                continue
            row = time_point(point, table, args, first_calls)
            record["points"].append(row)
            print(_line(row), flush=True)
            save(args, record)
    except Exception:
        record["error"] = traceback.format_exc()
        print(record["error"], flush=True)
    record["elapsed_s"] = round(time.time() - started, 1)
    save(args, record)
    print(f"done in {record['elapsed_s']:.0f} s" + (f", record in {args.json}" if args.json else ""), flush=True)
    return record


def _compile_line(entry) -> str:
    head = f"D={entry['D']} causal={int(entry['causal'])} {entry['label']}: "
    if not entry["ok"]:
        return head + "FAILED " + entry["error"]
    extra = "" if entry["fits"] else " (too much shared memory)"
    twin = f" same PTX as {entry['same_as']}" if "same_as" in entry else ""
    return (head + f"{entry['compile_s']:.1f} s, shared {entry['shared']}{extra}, registers {entry.get('registers')}, "
            f"stack {entry.get('stack')}{twin}")


if __name__ == "__main__":
    main()
