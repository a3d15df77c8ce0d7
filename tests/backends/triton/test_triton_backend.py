"""The Triton backend's parts: the sympy -> Triton printer, supports(), priority, the search
space's keep() filter, plan tables from attncc.plan, the generated text, and autograd."""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

# Triton decorates its own helpers at import: the interpreter must be on before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins"))

from attncc.errors import BackendError, InputError  # noqa: E402
from attncc.passes.pipeline import lower  # noqa: E402
from attncc.plan import build_plan  # noqa: E402
from attncc.reference import attend  # noqa: E402
from attncc.spec import load_spec  # noqa: E402
from attncc.spec.numeric import evaluate  # noqa: E402
from attncc.target import Target  # noqa: E402
from attncc.testing import examples_dir, random_inputs  # noqa: E402
from attncc_triton import TritonBackend  # noqa: E402
from attncc_triton.kernel import load_module  # noqa: E402
from attncc_triton.printer import TritonPrinter  # noqa: E402
from attncc_triton.source import RUNTIME  # noqa: E402

CPU = Target.detect("cpu")


@pytest.fixture
def interpret():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was set to something else before these tests")


def _spec(**fields):
    return load_spec({"attncc": 1, "name": "t", **fields})


def test_supports_needs_a_gpu_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    support = TritonBackend().supports(lower(_spec()), CPU)
    assert not support and "TRITON_INTERPRET=1" in support.reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonBackend().supports(lower(_spec()), CPU)


def test_priority_is_negative_on_cpu_and_high_on_cuda():
    backend = TritonBackend()
    assert backend.priority(CPU) == -1
    assert backend.priority(replace(CPU, kind="cuda")) == 30


def test_keep_drops_configs_over_the_targets_shared_memory():
    graph = lower(_spec(head_dim=128))
    gpu = replace(CPU, kind="cuda", shared_memory_per_block=48 * 1024, registers_per_block=65536)
    space = TritonBackend().search_space(graph, gpu)
    configs = space.configs()
    assert configs and len(configs) < len(TritonBackend().search_space(graph, CPU).configs())
    big = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 4}
    assert not space.keep(big)
    with pytest.raises(BackendError, match="cannot run for float32"):
        TritonBackend().compile(graph, big, gpu)


AOT = Path(__file__).resolve().parents[3] / "bench" / "results" / "triton_aot_sm90.json"
H200 = Target(kind="cuda", device="NVIDIA H200 (AOT)", arch="cuda", compute_capability=(9, 0),
              shared_memory_per_block=227 * 1024, sm_count=132, registers_per_block=65536)


def _space(name: str, dtype: str | None):
    graph = lower(load_spec(examples_dir() / f"{name}.yaml"))
    if dtype is not None:
        graph.graph["dtype"] = dtype
    return graph, TritonBackend().search_space(graph, H200)


def test_keep_scales_with_the_dtype_as_the_sm90_compiler_measured():
    """The saved AOT run compiled causal at 64x64 in float64 to 329 KB of shared memory (over an
    H200 block's 227 KiB) and in bfloat16 to 64 KB: keep() must tell them apart."""
    import json

    runs = json.loads(AOT.read_text(encoding="utf-8"))["configs"]
    measured = {c["dtype"]: c for c in runs if c["spec"] == "causal" and c["default"]}
    f64, bf16 = measured["float64"], measured["bfloat16"]
    assert f64["config"] == bf16["config"] == {"block_m": 64, "block_n": 64, "num_warps": 8,
                                                "num_stages": 2}
    assert f64["shared"] > 227 * 1024 >= bf16["shared"]
    assert not _space("causal", "float64")[1].keep(f64["config"])
    assert not _space("causal", "float64")[1].accepts(f64["config"])
    assert _space("causal", "bfloat16")[1].keep(bf16["config"])
    assert _space("causal", "float32")[1].keep(measured["float32"]["config"])  # 147 KB measured
    # without a dtype, keep() judges float32 (Backend.search_space's contract)
    assert _space("causal", None)[1].keep(measured["float32"]["config"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_default_config_fits_its_dtype(dtype):
    graph, space = _space("causal", dtype)
    config = TritonBackend().default_config(graph, H200)
    assert space.keep(config), config
    if dtype == "float64":
        assert config["block_m"] * config["block_n"] < 64 * 64


def test_default_config_without_a_kept_tile_is_still_valid():
    """The additive score keeps a block_m x block_n x d tensor: in float64 it spills at every
    tile, so keep() admits none; the default is the smallest tile, which valid() accepts."""
    graph, space = _space("additive", "float64")
    assert not space.configs()
    config = TritonBackend().default_config(graph, H200)
    assert space.accepts(config) and config["block_m"] == config["block_n"] == 16


def test_unknown_dtype_is_an_error():
    graph, _ = _space("causal", None)
    graph.graph["dtype"] = "int8"
    with pytest.raises(BackendError, match=r"dtype must be one of .* got 'int8'"):
        TritonBackend().search_space(graph, H200)


def test_topk_needs_block_n_at_least_k():
    graph = lower(_spec(normalize="topk", topk=64))
    space = TritonBackend().search_space(graph, CPU)
    assert all(c["block_n"] >= 64 for c in space.configs())
    assert TritonBackend().default_config(graph, CPU)["block_n"] >= 64


def test_unknown_tunable_is_an_error(interpret):
    with pytest.raises(BackendError, match="unknown tunable 'tile'"):
        TritonBackend().compile(lower(_spec()), {"tile": 3}, CPU)


EXPRS = [("mask", "(q_idx - kv_idx) // 3 == 0"), ("mask", "(kv_idx - q_idx) % 5 < 2"),
         ("mask", "not (kv_idx <= q_idx) or q_idx % 4 == 1"),
         ("score_mod", "abs(q_idx - kv_idx) * (q_idx - kv_idx if kv_idx < q_idx else "
                       "min(kv_idx, 7))"),
         ("score_mod", "floor((q_idx - 9) / 4) + ceil(kv_idx / 3) + (kv_idx - 11) // 4"),
         ("mask", "(q_idx & 3) == (kv_idx >> 1) or ((q_idx ^ kv_idx) | 1) << 1 == 6"),
         ("mask", "((q_idx > 4) == (kv_idx > 9)) and ((q_idx > 2) != (kv_idx < 3))"),
         ("score_mod", "sin(q_idx / 3) + cos(kv_idx) + tan(q_idx / 20) + erf(kv_idx / 8 - 1)"),
         ("score_mod", "sign(q_idx - kv_idx) + round((q_idx - kv_idx) / 2) + exp2(-kv_idx / 4) "
                       "+ log2(q_idx + 1) + 2 ** (-8 * (q_idx + 1) / 16)"),
         ("score_mod", "clamp(q_idx - kv_idx, -3, 4) + silu(kv_idx / 4 - 2) + gelu(q_idx / 4 - 2) "
                       "+ gelu_tanh(kv_idx / 5 - 1)")]


@pytest.mark.parametrize("field,text", EXPRS)
def test_printer_means_what_numeric_evaluate_means(field, text, interpret):
    import triton.language as tl

    from attncc_triton.source import HELPERS

    spec = _spec(**{field: text})
    expr = spec.mask if field == "mask" else spec.score_mod
    code = TritonPrinter(set())(expr)
    helpers = "\n\n".join(HELPERS.values())
    source = (f"import triton\nimport triton.language as tl\n\n\n{helpers}\n\n"
              f"@triton.jit\ndef probe(O, ACC: tl.constexpr):\n"
              f"    q_idx = tl.arange(0, 16)[:, None]\n    kv_idx = tl.arange(0, 16)[None, :]\n"
              f"    r = ({code}) + q_idx * 0 + kv_idx * 0\n"
              f"    tl.store(O + q_idx * 16 + kv_idx, r.to(tl.float32))\n")
    module = load_module(source)
    out = torch.zeros(256)
    module.probe[(1,)](out, ACC=tl.float32)
    env = {"q_idx": np.arange(16)[:, None], "kv_idx": np.arange(16)[None, :]}
    want = np.broadcast_to(np.asarray(evaluate(expr, env, np), dtype=np.float64), (16, 16))
    np.testing.assert_allclose(out.reshape(16, 16).numpy(), want, rtol=2e-6, atol=2e-6)


def test_every_derivative_sympy_makes_prints():
    """Heaviside, sign, DiracDelta and unevaluated derivatives of floor, mod, round are
    rewritten before printing: the backward of any grammar function prints."""
    from attncc.spec.symbols import score
    from attncc_triton.printer import derivatives

    spec = _spec(score_mod="abs(score) + max(score, 0) + min(score, q_idx) + floor(score) + "
                           "score % 3 + sign(score) + round(score) + erf(score) + tan(score) + "
                           "clamp(score, -1, 1) + exp2(score) + log2(1 + score * score) + "
                           "floor(3 * score) + ceil(score / 2) + score % 0.5")
    d_score, _, _ = derivatives(spec.score_mod, score, set())
    assert "Derivative" not in str(d_score) and "Subs" not in str(d_score)
    assert "DiracDelta" not in TritonPrinter(set())(d_score)


def test_a_forward_never_fails_on_its_derivative(monkeypatch, interpret):
    """Compile prints and loads the forward only; the derivative is taken on the first backward
    call, and where it cannot be printed only the backward fails, saying why."""
    import attncc_triton.fused as fused

    calls = []

    def refuse(*args):
        calls.append(args)
        raise BackendError("triton backend: cannot differentiate this")

    monkeypatch.setattr(fused, "derivatives", refuse)
    spec = _spec(score_mod="score * 0.5")
    kernel = TritonBackend().compile(lower(spec), None, CPU)
    q, k, v, ins = random_inputs(spec, 1, 16, 16, "float32", seed=0, library="torch")
    assert kernel(q, k, v, **ins).shape == (*q.shape[:3], v.shape[3])
    assert not calls and "def _bwd_dq(" not in kernel.forward_source
    q.requires_grad_(True)
    with pytest.raises(BackendError, match=r"no backward for the spec 't' \(its forward "
                                           r"runs\): triton backend: cannot differentiate this"):
        kernel(q, k, v, **ins).sum().backward()
    assert "def _bwd_dq(" not in kernel.source and "cannot differentiate this" in kernel.source


def test_the_backward_is_generated_on_first_use(interpret):
    """The forward module has no backward kernels; the first backward call generates the whole
    module (``kernel.source``), loads its dq and dk/dv kernels, and the gradients are right."""
    spec = _spec(score_mod="score - 0.1 * (q_idx - kv_idx)")
    kernel = TritonBackend().compile(lower(spec), None, CPU)
    assert "def _fwd(" in kernel.forward_source and "_bwd_dq" not in kernel.forward_source
    assert kernel._source is None and "bwd_dq" not in kernel.program.kernels
    q, k, v, ins = random_inputs(spec, 1, 20, 20, "float64", seed=0, library="torch")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kernel(*leaves, **ins).sum().backward()
    assert "def _bwd_dq(" in kernel.source and "bwd_dq" in kernel.program.kernels
    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    attend(spec, *ref, ins).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("name", ["sliding_window.yaml", "document_mask.yaml", "bigbird.yaml"])
def test_plan_tables_come_from_attncc_plan_and_only_skip_work(name, interpret):
    """The kernel runs attncc's block plan; the standalone module, given no tables, visits
    every block as PARTIAL: the same output, so EMPTY blocks were empty and FULL ones full."""
    spec = load_spec(examples_dir() / name)
    graph = lower(spec)
    kernel = TritonBackend().compile(graph, TritonBackend().default_config(graph, CPU), CPU)
    q, k, v, inputs = random_inputs(spec, 2, 40, 40, "float32", 0, "torch")
    sizes = {"batch": 2, "heads": 4, "kv_heads": 2, "seq_q": 40, "seq_k": 40,
             "head_dim": 16, "value_dim": 16}
    cfg = kernel.config
    tables = kernel.tables(sizes, inputs, q.device)
    plan = build_plan(spec, sizes, cfg["block_m"], cfg["block_n"], inputs=inputs)
    np.testing.assert_array_equal(tables["fc"].numpy(), plan.full_counts)
    np.testing.assert_array_equal(tables["pit"].numpy(), plan.partial_index_t)
    if not inputs:  # an index-only mask: the tables are cached with the plan
        assert kernel.tables(sizes, inputs, q.device)["fi"] is tables["fi"]
    out_plan = kernel(q, k, v, **inputs)
    out_dense = load_module(kernel.source).attention(q, k, v, **inputs)
    torch.testing.assert_close(out_plan, out_dense)


def test_source_is_a_standalone_module_with_a_glossary(interpret):
    spec = load_spec(examples_dir() / "alibi.yaml")
    graph = lower(spec)
    kernel = TritonBackend().compile(graph, TritonBackend().default_config(graph, CPU), CPU)
    tree = ast.parse(kernel.source)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"math", "triton", "triton.language", RUNTIME}
    assert "Glossary" in kernel.source and "slope_ptr" in kernel.source
    # the score block is written once, the mask in it under MASK (PARTIAL blocks); one tile
    # function per pass, called for the FULL and the PARTIAL blocks of fwd, dq's exact-delta
    # pass, dq and dk/dv; slope[h] loaded once per head, outside the loops
    assert kernel.source.count("keep = keep & (") == 1
    assert kernel.source.count("def _scores(") == 1
    assert kernel.source.count("for it in range(0, tl.load(FC + row))") == 4
    assert kernel.source.count("MASK=True") == 4
    assert "(q_idx - kv_idx) * slope_h" in kernel.source
    assert kernel.source.count("slope_h = tl.load(") == 3  # fwd, dq, dk/dv's head loop
    assert max(len(line) for line in kernel.source.splitlines()) <= 100


def test_autograd_through_the_kernel_matches_float64(interpret):
    spec = load_spec(examples_dir() / "alibi.yaml")
    graph = lower(spec)
    kernel = TritonBackend().compile(graph, TritonBackend().default_config(graph, CPU), CPU)
    q, k, v, inputs = random_inputs(spec, 1, 20, 20, "float64", 3, "torch")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, inputs["slope"])]
    out, lse = kernel(*leaves[:3], return_lse=True, slope=leaves[3])
    (out.sum() + lse.sum()).backward()
    from attncc.reference import attend

    ref = [x.clone().requires_grad_() for x in (q, k, v, inputs["slope"])]
    r_out, r_lse = attend(spec, *ref[:3], {"slope": ref[3]}, return_lse=True)
    (r_out.sum() + r_lse.sum()).backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9)


def test_linear_keep_drops_chunks_over_shared_memory_as_measured():
    """The saved AOT run compiled linear_elu at chunk 64 (F = Dv = 128) to 262 KB of shared
    memory in float64 (over an H200 block's 227 KiB) and less in the other dtypes: keep() must
    drop the first, keep the others, and its estimate must bound every measurement."""
    import json

    from attncc_triton.space import elem_bytes, linear_smem

    runs = [c for c in json.loads(AOT.read_text(encoding="utf-8"))["configs"]
            if c["spec"] == "linear_elu"]
    assert {c["dtype"] for c in runs} >= {"bfloat16", "float32", "float64"}
    for run in runs:
        _, space = _space("linear_elu", run["dtype"])
        assert space.keep(run["config"]) == (run["shared"] <= 227 * 1024), run
        assert linear_smem(run["config"], 128, 128, elem_bytes(run["dtype"])) >= run["shared"]
    assert not _space("linear_elu", "float64")[1].accepts({"chunk": 64, "num_warps": 4,
                                                           "num_stages": 2})
    # absent dtype = float32; the element size scales the estimate
    assert linear_smem({"chunk": 128}, 128, 128, 4) == 2 * linear_smem({"chunk": 128}, 128, 128,
                                                                        2) - 2048
    assert not _space("linear_elu", None)[1].keep({"chunk": 128, "num_warps": 4,
                                                   "num_stages": 1})
    assert _space("linear_elu", "bfloat16")[1].keep({"chunk": 128, "num_warps": 4,
                                                     "num_stages": 1})


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_linear_default_config_fits_its_dtype(dtype):
    graph, space = _space("linear_elu", dtype)
    config = TritonBackend().default_config(graph, H200)
    assert space.accepts(config) and space.keep(config), config
    assert config["chunk"] == (16 if dtype == "float64" else 64)


class _Spy:
    """A jit function that counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]

    def __getattr__(self, name):  # arg_names and the rest, as the kernel has them
        return getattr(self.kernel, name)


@pytest.mark.parametrize("name,heads", [("linear_elu", None), ("performer", None),
                                        ("linear_elu", (4, 2))])
def test_linear_backward_runs_the_kernel_and_matches_float64(name, heads, interpret,
                                                             monkeypatch):
    spec = load_spec(examples_dir() / f"{name}.yaml")
    if heads is not None:
        spec = replace(spec, heads=heads[0], kv_heads=heads[1])
    graph = lower(spec)
    kernel = TritonBackend().compile(graph, TritonBackend().default_config(graph, CPU), CPU)
    spy = _Spy(kernel.program.kernels["linear_bwd"])
    monkeypatch.setitem(kernel.program.kernels, "linear_bwd", spy)
    q, k, v, inputs = random_inputs(spec, 1, 21, 21, "float64", 5, "torch")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    weights = torch.linspace(-1, 1, 21 * v.shape[-1], dtype=torch.float64)
    out = kernel(*leaves, **inputs)
    (out * weights.reshape(21, -1)).sum().backward()
    assert spy.launches == 1
    from attncc.reference import attend

    ref = [x.clone().requires_grad_() for x in (q, k, v)]
    (attend(spec, *ref, inputs) * weights.reshape(21, -1)).sum().backward()
    for got, want in zip(leaves, ref, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-9)


def test_linear_kernels_take_half_precision_operands(interpret):
    """fp16 φ(q), φ(k), v go to the dots as they are (the interpreter's bf16 dot is broken, so
    fp16 stands for both): values and gradients within half-precision error of float64."""
    spec = load_spec(examples_dir() / "linear_elu.yaml")
    graph = lower(spec)
    kernel = TritonBackend().compile(graph, TritonBackend().default_config(graph, CPU), CPU)
    gen = torch.Generator().manual_seed(0)
    pq, pk = (torch.rand(1, 2, 37, 16, generator=gen) for _ in range(2))
    v = torch.randn(1, 2, 37, 16, generator=gen)
    leaves = [x.half().double().requires_grad_() for x in (pq, pk, v)]
    out = kernel.program.linear_attention(*leaves)
    d_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(out, leaves, d_out)
    half = [x.detach().half().requires_grad_() for x in leaves]
    got_out = kernel.program.linear_attention(*half)
    assert got_out.dtype == torch.float16
    torch.testing.assert_close(got_out.double(), out.detach(), rtol=2e-2, atol=2e-2)
    got = torch.autograd.grad(got_out, half, d_out.half())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float16
        assert (g.double() - w).abs().max() <= 2e-2 * w.abs().max()


def test_an_input_read_outside_its_axis_is_an_input_error(interpret):
    """The printed kernels clamp every index; the host check gives the reference's error first
    (a relative bias read at q_idx - kv_idx, negative above the causal diagonal)."""
    spec = load_spec({"attncc": 1, "name": "rel", "mask": "kv_idx <= q_idx",
                      "score_mod": "score + rel[h, q_idx - kv_idx]",
                      "inputs": {"rel": {"shape": ["heads", "seq_q"], "dtype": "float32"}}})
    kernel = TritonBackend().compile(lower(spec), None, CPU)
    q, k, v, ins = random_inputs(spec, 1, 20, 20, "float32", seed=0, library="torch")
    with pytest.raises(InputError, match="'rel' is indexed outside its axis 1 of size 20"):
        kernel(q, k, v, **ins)
