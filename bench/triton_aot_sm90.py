"""Ahead-of-time compilation of the generated Triton kernels for an H200 (sm_90), no GPU needed.

For every example spec the Triton backend supports, the generated kernels (forward, dq and dk/dv of
fused specs; the chunked scan of linear specs) are compiled by ``triton.compile``
for ``GPUTarget("cuda", 90, 32)`` down to a cubin with the wheel's ptxas. Per kernel it records
whether it compiled (or the compiler's error), ``metadata.shared`` (bytes), the registers per
thread and spill bytes (ptxas -v log; cuobjdump as a fallback). Each config is then judged against
the H200's limits (227 KiB shared memory per block, 255 registers per thread, 64 K registers per
SM) and compared with the backend's ``keep()`` filter on an H200 target.

    python bench/triton_aot_sm90.py                      # full report -> bench/results/
    python bench/triton_aot_sm90.py --specs causal,alibi --dtypes bfloat16 --sweep none \\
        --json /tmp/out.json --no-md    # what tests/backends/triton/test_triton_aot.py runs

Sizes: head_dim is the spec's, else 128 (value_dim likewise). ``--sweep sample`` (the default)
compiles the default config of every spec in every dtype, plus for a few representative specs in
bfloat16 a sample of the search space of ``causal`` (every block_m x block_n in {64, 128},
num_warps 4 and 8, num_stages 1 to 4: 32 of the 256 configs); ``--sweep full`` takes all 256.
A kernel not compiled within ``--timeout`` seconds (120) is recorded as a timeout (and the
spec's other kernels are skipped). Every spec is compiled in bfloat16; the other dtypes only for
``--wide-specs`` (default causal, linear_elu), float32/float64 kernels being slow to build.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # AOT compilation needs the real JIT, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]

SMEM_LIMIT = 227 * 1024  # max dynamic shared memory one block can opt in to on sm_90
REGS_PER_THREAD = 255
REGS_PER_SM = 65536
DTYPES = {"float16": ("fp16", "fp32"), "bfloat16": ("bf16", "fp32"), "float32": ("fp32", "fp32"),
          "float64": ("fp64", "fp64")}
INPUT_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
               "int32": "i32", "int64": "i64", "bool": "i1"}
SWEEP_SPECS = ("causal",)
SAMPLE = [{"block_m": m, "block_n": n, "num_warps": w, "num_stages": s}
          for m in (64, 128) for n in (64, 128) for w in (4, 8) for s in (1, 2, 3, 4)]
_ELEM = {"Q", "K", "V", "MK", "MV", "W", "OUT", "DO", "DQ", "DK", "DV", "PQ", "PK"}
_ACC = {"LSE", "THR", "DELTA", "DLSE", "DMK", "DMV", "DW"}
_TABLES = {"FC", "FI", "PC", "PI"}


def h200_target():
    """The attncc Target of an H200 as Triton's driver reports one."""
    from attncc.target import Target

    return Target(kind="cuda", device="NVIDIA H200 (AOT)", arch="cuda", compute_capability=(9, 0),
                  shared_memory_per_block=SMEM_LIMIT, sm_count=132,
                  registers_per_block=REGS_PER_SM)


@dataclass
class Result:
    """One kernel of one (spec, dtype, config)."""

    spec: str
    dtype: str
    config: dict
    kernel: str
    ok: bool = False
    error: str = ""
    shared: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        """Compiled and launchable on an H200: shared memory and registers within its limits
        (spills are allowed: they cost speed, not correctness)."""
        return (self.ok and (self.shared or 0) <= SMEM_LIMIT
                and (self.registers or 0) <= REGS_PER_THREAD)


def signature(fn, el: str, acc: str, inputs: dict, consts: dict) -> tuple[dict, dict]:
    """Triton signature and divisibility attributes of a generated kernel's arguments, as the
    runtime would specialize a call with contiguous, 16-byte aligned tensors."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        if name in _ELEM:
            sig[name] = "*" + el
        elif name in _ACC or name.endswith("_grad"):
            sig[name] = "*" + acc
        elif name in _TABLES or name == "STATES":
            sig[name] = "*i32" if name != "STATES" else "*i8"
        elif name.endswith("_ptr"):
            decl = inputs[name[:-4]]
            sig[name] = "*" + (el if decl.is_float else INPUT_TYPES[decl.dtype])
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def kernels_for(spec, node, kind: str, config: dict, dtype: str) -> list[tuple]:
    """``(name, jit function, constexprs, options)`` of every kernel the module launches."""
    import triton.language as tl

    from attncc_triton.kernel import load_module
    from attncc_triton.runtime import pow2
    from attncc_triton.source import generate

    module = load_module(generate(spec, node, config))
    acc = tl.float64 if dtype == "float64" else tl.float32
    d = spec.head_dim or 128
    dv = spec.value_dim or d
    opts = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    if kind == "linear":
        feats = spec.features or d
        consts = dict(ACC=acc, PREC="ieee", CAUSAL=bool(getattr(node, "causal", False)),
                      CHUNK=config["chunk"], BLOCK_F=pow2(feats), BLOCK_DV=pow2(dv))
        return [("linear", module.PROGRAM.kernels["linear"], consts, opts)]
    consts = dict(ACC=acc, PREC="ieee", MEM=spec.memory_tokens, TOPK=spec.topk or 1,
                  BLOCK_M=config["block_m"], BLOCK_N=config["block_n"], BLOCK_D=pow2(d),
                  BLOCK_DV=pow2(dv))
    result = []
    for name in ("fwd", "bwd_dq", "bwd_dkdv"):  # each kernel takes the constants it reads
        fn = module.PROGRAM.kernels[name]
        result.append((name, fn, {k: v for k, v in consts.items() if k in fn.arg_names}, opts))
    return result


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                    r".*?Used (\d+) registers", re.S)


def _cuobjdump(cubin: bytes) -> dict:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return {"registers": int(found.group(1)), "stack": int(found.group(2))} if found else {}


def compile_one(res: Result, fn, consts: dict, opts: dict, inputs: dict,
                timeout: float = 120.0) -> Result:
    """AOT-compiles one kernel for sm_90 into ``res``, in a forked child killed after
    ``timeout`` seconds (ptxas can take minutes, or all memory, on a huge unrolled kernel);
    errors are recorded, not raised."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_compile_child, args=(queue, res, fn, consts, opts, inputs))
    start = time.perf_counter()
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        res.error = f"timeout: not compiled within {timeout:.0f} s"
    elif not queue.empty():
        res = queue.get()
    else:
        res.error = f"compiler process died (exit code {child.exitcode}, likely out of memory)"
    res.seconds = time.perf_counter() - start
    return res


def _compile_child(queue, res: Result, fn, consts: dict, opts: dict, inputs: dict):

    # a fresh cache: a cubin cached for an identical kernel (gqa = dense) skips ptxas and its log
    cache = tempfile.mkdtemp(prefix="attncc_aot_one_")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        _compile_into(queue, res, fn, consts, opts, inputs)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _compile_into(queue, res: Result, fn, consts: dict, opts: dict, inputs: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    el, acc = DTYPES[res.dtype]
    sig, attrs = signature(fn, el, acc, inputs, consts)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                               options=opts)
    except Exception as err:  # the compiler's own error is the datum
        res.error = _one_line(err)
        queue.put(res)
        return
    res.ok = True
    res.shared = int(k.metadata.shared)
    found = _PTXAS.search(log.getvalue())
    if found:
        res.stack, res.spill_stores, res.spill_loads, res.registers = map(int, found.groups())
    else:  # cached cubin: no ptxas log; registers and stack from the binary
        res.extra = _cuobjdump(k.asm["cubin"])
        res.registers, res.stack = res.extra.get("registers"), res.extra.get("stack")
    queue.put(res)


def _one_line(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if "rror" in ln or "ptxas" in ln.lower()] or lines
    return " | ".join(keep[:3])[:400]


def run(specs: list[str] | None, dtypes: list[str], sweep: str, quiet: bool,
        timeout: float = 120.0, config_override: dict | None = None,
        kernels: set[str] | None = None, wide: set[str] | None = None,
        head_dim: int | None = None) -> dict:
    import triton

    from attncc.backends.base import SearchSpace
    from attncc.passes.pipeline import lower
    from attncc.spec import load_spec
    from attncc.testing import example_specs
    from attncc_triton import _kind
    from attncc_triton.space import default_config, search_space

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    target = h200_target()
    results, configs = [], []
    for path in example_specs():
        if specs and path.stem not in specs:
            continue
        spec = load_spec(path)
        if head_dim:  # the spec's own head_dim wins; else this one instead of 128
            spec = replace(spec, head_dim=spec.head_dim or head_dim,
                           value_dim=spec.value_dim or spec.head_dim or head_dim)
        graph = lower(spec)
        kind, node = _kind(graph)
        space = search_space(spec, kind, target, "bfloat16")

        def default(dt, spec=spec, kind=kind):
            return {**default_config(spec, kind, target, dt), **(config_override or {})}
        todo = [(dt, default(dt), True) for dt in dtypes
                if dt == "bfloat16" or wide is None or path.stem in wide]
        if sweep != "none" and path.stem in SWEEP_SPECS and kind == "fused":
            grid = SAMPLE if sweep == "sample" else SearchSpace(space.params).configs()
            todo += [("bfloat16", c, False) for c in grid if c != default("bfloat16")]
        timed_out = False
        for dtype, config, is_default in todo:
            rows = []
            for name, fn, consts, opts in kernels_for(spec, node, kind, config, dtype):
                if kernels and name not in kernels:
                    continue
                res = Result(path.stem, dtype, config, name)
                if timed_out:  # a kernel of this spec already ran past the time limit
                    res.error = "skipped: an earlier kernel of this spec timed out"
                else:
                    res = compile_one(res, fn, consts, opts, spec.inputs, timeout)
                    timed_out = res.error.startswith("timeout")
                rows.append(res)
                if not quiet:
                    print(f"{path.stem:16s} {dtype:9s} {_cfg(config):18s} {name:9s} "
                          + (f"smem {res.shared:6d} regs {res.registers} spill "
                             f"{res.spill_stores}" if res.ok else "FAIL " + res.error[:120]),
                          flush=True)
            results += rows
            entry = {"spec": path.stem, "kind": kind, "dtype": dtype, "config": config,
                     "default": is_default}
            configs.append(judge(entry, [r.__dict__ for r in rows], spec, kind, target))
    return {"date": datetime.date.today().isoformat(), "triton": triton.__version__,
            "target": "cuda sm_90 (GPUTarget('cuda', 90, 32))",
            "limits": {"shared_per_block": SMEM_LIMIT, "regs_per_thread": REGS_PER_THREAD,
                       "regs_per_sm": REGS_PER_SM},
            "kernels": [r.__dict__ for r in results], "configs": configs}


def judge(entry: dict, rows: list[dict], spec, kind: str, target) -> dict:
    """``entry`` completed with what the compiler says of its kernels (``rows``) and what the
    backend's ``keep`` and ``estimate`` say of the config for the entry's dtype."""
    from attncc_triton.space import elem_bytes, estimate, search_space

    space = search_space(spec, kind, target, entry["dtype"])

    main = rows
    fits = all(r["ok"] and (r["shared"] or 0) <= SMEM_LIMIT
               and (r["registers"] or 0) <= REGS_PER_THREAD for r in rows)
    entry.update(keep=bool(space.keep(entry["config"])), fits=fits,
                 compiled=all(r["ok"] for r in rows),
                 shared=max((r["shared"] or 0) for r in main),
                 spills=sum((r["spill_stores"] or 0) for r in main))
    if entry["kind"] != "linear":
        d = spec.head_dim or 128
        entry["est_shared"], entry["est_regs"] = estimate(entry["config"], spec, d,
                                                          spec.value_dim or d,
                                                          elem_bytes(entry["dtype"]))
    return entry


def rejudge(data: dict) -> dict:
    """Re-applies ``judge`` (the current keep() and estimate) to a saved run, compiling nothing."""
    from attncc.passes.pipeline import lower
    from attncc.spec import load_spec
    from attncc.testing import examples_dir
    from attncc_triton import _kind

    target, paths = h200_target(), {p.stem: p for p in examples_dir().iterdir()}
    for entry in data["configs"]:
        spec = load_spec(paths[entry["spec"]])
        rows = [k for k in data["kernels"] if k["spec"] == entry["spec"]
                and k["dtype"] == entry["dtype"] and k["config"] == entry["config"]]
        judge(entry, rows, spec, _kind(lower(spec))[0], target)
    return data


def _cfg(config: dict) -> str:
    if "chunk" in config:
        return f"c{config['chunk']} w{config['num_warps']} s{config['num_stages']}"
    return (f"{config['block_m']}x{config['block_n']} w{config['num_warps']} "
            f"s{config['num_stages']}")


NOTES = """## Notes

- Fixed from these runs: the dk/dv kernel of every score_mod reading a floating input (alibi,
  relative_bias...) did not compile (its input-gradient temporary reused `g`, the query-head loop
  variable, with a tile type); the additive score at 64x64 (a 64x64x128 tensor in registers) did
  not compile within 45 s (ptxas was killed at 64x64 on an earlier run): keep() now counts that
  tensor and the default falls to 16x16 with 8 warps; the CUDA default moved from 4 to 8 warps
  (4 warps spill in both backward kernels at d = 128).
- keep() judges the dtype it is given (`graph.graph["dtype"]`, float32 when absent): the
  shared-memory and register estimates scale with the element size (float64 accumulates in
  2-word registers), so float64 at 64x64 (329 KB measured) is dropped and the float64 default
  falls to 32x64 (estimate 215 KB; not compiled yet). The `default` column of a re-judged run
  names the default at compile time. float32 and float64 kernels take their `tl.dot`s on the FMA
  path (`input_precision="ieee"`); float32 spills tens of KB (ptxas settles on 32 registers),
  which keep()'s register rule does not see.
- Dropped although they fit: configs rejected by keep()'s register rule (estimated words per
  thread above twice the register file): they compile, but spill kilobytes in every kernel.
- The dk/dv kernel spills 0.5-1.5 KB at every measured config: it transposes the probability and
  score-gradient tiles in registers (`tl.trans(p)`, `tl.trans(dsr)`); computing the transposed
  scores (`k @ q^T`) directly, as Triton's fused-attention tutorial does, would avoid it.
- `spill None`: the cubin came from Triton's cache (a kernel identical to another spec's, e.g.
  gqa = dense), so no ptxas log; registers are from cuobjdump. Fixed for later runs.
- The linear-attention kernel (linear.py) used to cast its tiles to float32 before `tl.dot`,
  which in bf16 took the FMA path (98 KB shared memory, 100 KB spills at chunk 64); it now keeps
  the operands in the input dtype: 49 KB shared, 1.6 KB spills in bf16 (recompiled alone; the
  float16 row above predates the change). `_linear_bwd` is not compiled by this bench yet."""


def markdown(data: dict) -> str:
    """The human-readable report of ``run``'s data."""
    kernels, configs = data["kernels"], data["configs"]
    ok = [k for k in kernels if k["ok"]]
    lines = [f"# Triton kernels compiled ahead of time for sm_90 (H200), {data['date']}", "",
             f"triton {data['triton']}, target {data['target']}; limits: "
             f"{SMEM_LIMIT} B shared memory per block, {REGS_PER_THREAD} registers per thread, "
             f"{REGS_PER_SM} per SM. No GPU: ptxas from the triton wheel; numbers are what the "
             "compiler reports, nothing was run.", "", "## Summary", "",
             f"- {len(ok)} of {len(kernels)} kernels compiled "
             f"({len(configs)} (spec, dtype, config) combinations).", ""]
    lines += ["| dtype | kernels | compiled | spilling | over shared-memory limit |",
              "|---|---|---|---|---|"]
    for dtype in DTYPES:
        rows = [k for k in kernels if k["dtype"] == dtype]
        if rows:
            lines.append(f"| {dtype} | {len(rows)} | {sum(k['ok'] for k in rows)} | "
                         f"{sum(bool(k['spill_stores']) for k in rows)} | "
                         f"{sum((k['shared'] or 0) > SMEM_LIMIT for k in rows)} |")
    failed = [k for k in kernels if not k["ok"]]
    lines += ["", "## Failures", ""]
    if not failed:
        lines.append("None.")
    by_error: dict[str, list] = {}
    for k in failed:
        by_error.setdefault(k["error"][:160], []).append(k)
    for err, rows in by_error.items():
        names = sorted({f"{k['spec']}/{k['dtype']}/{k['kernel']}" for k in rows})
        lines.append(f"- `{err}`: {len(rows)} kernel(s): {', '.join(names[:12])}"
                     + (" ..." if len(names) > 12 else ""))
    worst = sorted(ok, key=lambda k: (-(k["spill_stores"] or 0), -(k["registers"] or 0)))[:15]
    lines += ["", "## Worst register / spill cases", "",
              "| spec | dtype | config | kernel | regs | spill stores B | stack B | shared B |",
              "|---|---|---|---|---|---|---|---|"]
    for k in worst:
        lines.append(f"| {k['spec']} | {k['dtype']} | {_cfg(k['config'])} | {k['kernel']} | "
                     f"{k['registers']} | {k['spill_stores']} | {k['stack']} | {k['shared']} |")
    lines += ["", "## keep() against the compiler", "",
              "`fits`: every kernel of the config compiled, shared memory <= the limit. "
              "`keep`: the backend's filter on an H200 target. A config kept that does not fit "
              "would fail at launch; one dropped that fits is lost to the tuner.", ""]
    wrong = [c for c in configs if c["keep"] and not c["fits"]]
    lost = [c for c in configs if not c["keep"] and c["fits"]]
    agree = len(configs) - len(wrong) - len(lost)
    lines.append(f"- {agree} of {len(configs)} agree; {len(wrong)} kept but do not fit; "
                 f"{len(lost)} dropped although they fit.")
    for title, rows in (("Kept but do not fit", wrong), ("Dropped although they fit", lost)):
        if rows:
            lines += ["", f"### {title}", "", "| spec | dtype | config | shared B | estimate B "
                      "| spill B | estimated regs/thread |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {c['spec']} | {c['dtype']} | {_cfg(c['config'])} | {c['shared']} | "
                      f"{c.get('est_shared', '-')} | {c['spills']} | {c.get('est_regs', '-')} |"
                      for c in rows]
    half = [c for c in configs if "est_shared" in c and c["compiled"]
            and c["dtype"] in ("bfloat16", "float16")]
    under = [c for c in half if c["shared"] > c["est_shared"]]
    lines += ["", f"- 2-byte dtypes: the shared-memory estimate is below the measured value for "
              f"{len(under)} of {len(half)} compiled fused configs (keep() is meant to be "
              "conservative for bf16/fp16: this must be 0)."]
    for dtype in ("float32", "float64"):
        rows = [c for c in configs if "est_shared" in c and c["compiled"] and c["dtype"] == dtype]
        lines += [f"- {dtype}: " + ("; ".join(
            f"{c['spec']} {_cfg(c['config'])} measured {c['shared']} B, estimate "
            f"{c['est_shared']} B, keep {c['keep']}" for c in rows) or "no fused config") + "."]
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", help="comma-separated example names (default: all)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32,float64")
    parser.add_argument("--sweep", choices=("none", "sample", "full"), default="sample")
    parser.add_argument("--json", help="where to write the JSON (default bench/results/)")
    parser.add_argument("--no-md", action="store_true", help="skip the Markdown report")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--config", help="JSON dict overriding the default config's values")
    parser.add_argument("--kernels", help="comma-separated subset of fwd,bwd_dq,bwd_dkdv,"
                                          "linear (default: all)")
    parser.add_argument("--wide-specs", default="causal,linear_elu",
                        help="specs compiled in the dtypes other than bfloat16 ('all': every "
                             "spec); fp32 and fp64 kernels take ~30 s each to compile")
    parser.add_argument("--head-dim", type=int, help="head_dim of specs that leave it open "
                                                      "(default 128)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per kernel")
    parser.add_argument("--rejudge", metavar="JSON", help="re-judge a saved run with the "
                                                             "current keep() (no compiling)")
    args = parser.parse_args(argv)
    if args.rejudge:
        data = rejudge(json.loads(Path(args.rejudge).read_text(encoding="utf-8")))
        Path(args.rejudge).write_text(json.dumps(data, indent=1), encoding="utf-8")
        Path(args.rejudge).with_suffix(".md").write_text(markdown(data), encoding="utf-8")
        return 0
    specs = args.specs.split(",") if args.specs else None
    data = run(specs, args.dtypes.split(","), args.sweep, args.quiet, args.timeout,
               json.loads(args.config) if args.config else None,
               set(args.kernels.split(",")) if args.kernels else None,
               None if args.wide_specs == "all" else set(args.wide_specs.split(",")),
               args.head_dim)
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / "triton_aot_sm90.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1), encoding="utf-8")
    if not args.no_md:
        out.with_suffix(".md").write_text(markdown(data), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
