"""The torch backend beyond the shared suite: plan use, lowerings, tunables, errors, autograd."""

import pytest
import torch

import attncc
from attncc.errors import BackendError, InputError
from attncc.passes.pipeline import lower
from attncc.plan import build_plan
from attncc.reference import attend
from attncc.testing import random_inputs
from attncc_torch import TorchBackend
from attncc_torch.tiles import build_schedule

BACKEND = TorchBackend()


def compile_spec(spec, **config):
    spec = attncc.load_spec(spec)
    graph = lower(spec)
    return BACKEND.compile(graph, {**BACKEND.default_config(graph, None), **config}, None)


def test_priority_and_supports():
    class Cuda:
        kind = "cuda"

    assert BACKEND.priority(None) == 10
    assert BACKEND.priority(Cuda()) == 20
    graph = lower(attncc.load_spec("examples/causal.yaml"))
    assert BACKEND.supports(graph, None)
    if not torch.cuda.is_available():
        assert "CUDA" in BACKEND.supports(graph, Cuda()).reason


def test_empty_blocks_are_never_visited():
    spec = attncc.load_spec("examples/sliding_window.yaml")
    sizes = {"batch": 1, "heads": 2, "kv_heads": 2, "seq_q": 512, "seq_k": 512, "head_dim": 8,
             "value_dim": 8}
    plan = build_plan(spec, sizes, 32, 32)
    sched = build_schedule(plan, 1, 2, 1, kv_chunk=8, group_blocks=64, tile_elems=1 << 22,
                           value_cost=1, memory=False, device="cpu")
    visited = sum(c.kv.numel() for s in sched.steps for c in s.chunks) * 2
    non_empty = int((plan.states != 0).sum()) * 2
    assert visited == sched.visited == non_empty < sched.total / 4
    for step in sched.steps:
        for chunk in step.chunks:  # FULL blocks first, then PARTIAL: the mask runs on the tail
            st = plan.states[0, 0][step.qblocks.numpy()[:, None], chunk.kv.numpy()]
            assert (st[:, :chunk.n_full] == 2).all() and (st[:, chunk.n_full:] == 1).all()


def test_sdpa_dispatch_is_said_in_source_and_matches():
    dense = compile_spec("examples/dense.yaml")
    assert "# path sdpa (" in dense.source and "scaled_dot_product_attention" in dense.source
    assert "# path sdpa: not served" in compile_spec("examples/alibi.yaml").source
    q, k, v, _ = random_inputs("examples/causal.yaml", 2, 70, 70, "float64", library="torch")
    via_sdpa = compile_spec("examples/causal.yaml")(q, k, v)
    via_plan = compile_spec("examples/causal.yaml", use_sdpa=False, block_m=16, block_n=32)(
        q, k, v)
    torch.testing.assert_close(via_sdpa, via_plan)


def test_search_space_keep_filters_invalid_configs():
    graph = lower(attncc.load_spec("examples/sigmoid.yaml"))  # no fused path serves it
    space = BACKEND.search_space(graph, None)
    assert set(space.params) == {"block_m", "block_n", "kv_chunk", "group_blocks",
                                 "tile_elems", "use_sdpa"}
    assert space.params["use_sdpa"] == (False,)
    default = BACKEND.default_config(graph, None)
    assert space.keep(default)
    assert not space.keep({**default, "use_sdpa": True})
    assert not space.keep({**default, "block_n": 256, "kv_chunk": 64})
    assert not space.keep({**default, "block_m": 256, "kv_chunk": 64, "tile_elems": 1 << 20})
    linear = BACKEND.search_space(lower(attncc.load_spec("examples/linear_elu.yaml")), None)
    assert set(linear.params) == {"chunk"}
    with pytest.raises(BackendError, match="unknown tunable 'bogus'"):
        compile_spec("examples/sigmoid.yaml", bogus=3)
    with pytest.raises(BackendError, match="use_sdpa=True is not a value backend 'torch' offers"):
        compile_spec("examples/sigmoid.yaml", use_sdpa=True)
    with pytest.raises(BackendError, match=r"cannot run for float32 on this target \(use_sdpa"):
        compile_spec("examples/sigmoid.yaml", block_m=256, block_n=256, kv_chunk=64)
    # soft-capping: the flex path (use_sdpa) ignores the tile knobs, which stay at the defaults
    graph = lower(attncc.load_spec("examples/softcap.toml"))
    space, default = BACKEND.search_space(graph, None), BACKEND.default_config(graph, None)
    assert space.params["use_sdpa"] == (True, False) and default["use_sdpa"]
    assert space.keep(default) and space.keep({**default, "use_sdpa": False})
    assert not space.keep({**default, "block_m": 64})


def _space(spec, seq):
    graph = lower(attncc.load_spec(spec))
    graph.graph["sizes"] = {"batch": 1, "seq_q": seq, "seq_k": seq}
    return BACKEND.search_space(graph, None), BACKEND.default_config(graph, None)


def test_keep_times_one_config_per_distinct_kernel():
    # Whole SDPA (dense): blocks and flash knobs unused -> exactly one use_sdpa config.
    space, default = _space("examples/dense.yaml", 512)
    fused = [c for c in space.configs() if c["use_sdpa"]]
    assert fused == [default]
    # Runs path (masked, CPU): blocks matter, flash knobs pinned to the defaults.
    space, default = _space("examples/sliding_window.yaml", 512)
    fused = [c for c in space.configs() if c["use_sdpa"]]
    assert len(fused) == 25
    assert {(c["kv_chunk"], c["group_blocks"]) for c in fused} == {(16, 64)}
    # Flash path: key tiles of 256..512 keys at seq 512, blocks no larger than the sequence.
    flash = [c for c in space.configs() if not c["use_sdpa"]]
    assert {c["block_n"] * c["kv_chunk"] for c in flash} == {256, 512}
    assert len(flash) == 5 * 10 * 4
    small, _ = _space("examples/sliding_window.yaml", 40)
    assert max(c["block_m"] for c in small.configs()) == 64


def test_compile_takes_a_valid_config_the_tuner_would_skip():
    space, default = _space("examples/sliding_window.yaml", 512)
    slow = {**default, "use_sdpa": False, "block_m": 16, "block_n": 16, "kv_chunk": 1}
    assert not space.keep(slow) and space.accepts(slow)
    kernel = attncc.compile("examples/sliding_window.yaml", backend="torch",
                            config={"use_sdpa": False, "block_m": 16, "block_n": 16,
                                    "kv_chunk": 1})
    q, k, v, _ = random_inputs("examples/sliding_window.yaml", 1, 40, 40, "float64",
                               library="torch")
    spec = attncc.load_spec("examples/sliding_window.yaml")
    torch.testing.assert_close(kernel(q, k, v), attend(spec, q, k, v, {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_return_their_dtype(dtype):
    kernel = compile_spec("examples/sliding_window.yaml")
    q, k, v, _ = random_inputs("examples/sliding_window.yaml", 1, 50, 50, "float32",
                               library="torch")
    out, lse = kernel(q.to(dtype), k.to(dtype), v.to(dtype), return_lse=True)
    assert out.dtype == dtype and lse.dtype == dtype
    ref = attncc.reference("examples/sliding_window.yaml", q, k, v)
    assert (out.double().numpy() - ref).__abs__().max() < 3e-2


def test_gqa_does_not_copy_keys_per_query_head():
    """Gathered key tiles of the tile loop have a kv-head axis, never a query-head one."""
    spec = "examples/mqa.json"
    kernel = compile_spec(spec, block_m=16, block_n=16, use_sdpa=False)
    q, k, v, _ = random_inputs(spec, 1, 40, 40, "float64", library="torch")
    seen = []
    original = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(b.shape)
        return original(a, b)

    torch.Tensor.__matmul__ = spy
    try:
        kernel(q, k, v)
    finally:
        torch.Tensor.__matmul__ = original
    assert seen and all(shape[1] == 1 for shape in seen)  # kv heads = 1, not 8
    torch.testing.assert_close(kernel(q, k, v), attend(spec, q, k, v, {}))


GQA_CAUSAL = {"attncc": 1, "name": "gqa_causal", "heads": 8, "kv_heads": 2,
              "mask": "kv_idx <= q_idx"}
GQA_WINDOW = {**GQA_CAUSAL, "name": "gqa_window",
              "mask": "kv_idx <= q_idx and q_idx - kv_idx < 20"}


@pytest.mark.parametrize("source", [GQA_CAUSAL, GQA_WINDOW], ids=["causal", "window"])
def test_gqa_fused_paths_read_kv_heads_without_copies(source):
    """GQA on the sdpa and runs paths: the fused kernels take the kv heads as they are (no
    repeat_interleave, index_select or gather of K/V), forward, and backward through sdpa."""
    kernel = compile_spec(source, block_m=16, block_n=16)
    q, k, v, _ = random_inputs(source, 1, 70, 70, "float32", library="torch")
    v = v[..., :q.shape[-1]].contiguous()  # the fused CPU kernel needs equal head sizes
    with torch.profiler.profile() as prof:
        out = kernel(q, k, v)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not names & {"aten::repeat_interleave", "aten::index_select", "aten::gather"}
    f64 = [x.double().requires_grad_() for x in (q, k, v)]
    want = attend(source, *f64, {})
    torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
    if source is GQA_CAUSAL:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        kernel(*leaves).pow(2).sum().backward()
        want.pow(2).sum().backward()
        for got, ref in zip(leaves, f64, strict=True):
            torch.testing.assert_close(got.grad.double(), ref.grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", ["examples/relative_bias.yaml", "examples/memory_tokens.yaml",
                                  "examples/additive.yaml", "examples/topk.yaml"])
def test_kernel_backward_matches_float64_autograd(spec):
    spec = attncc.load_spec(spec)
    kernel = compile_spec(spec, block_m=16, block_n=16, kv_chunk=2)
    q, k, v, inputs = random_inputs(spec, 2, 45, 45, "float64", seed=3, library="torch")
    grad_out = torch.randn(q.shape[:3] + v.shape[3:], dtype=torch.float64)
    got = kernel.backward(q, k, v, grad_out, **inputs)
    given = {"q": q, "k": k, "v": v, **inputs}
    leaves = {n: given[n].clone().requires_grad_() for n in got}
    ins = {n: leaves.get(n, x) for n, x in inputs.items()}
    attend(spec, leaves["q"], leaves["k"], leaves["v"], ins).backward(grad_out)
    assert set(got) == {"q", "k", "v", *(n for n in inputs if inputs[n].is_floating_point())}
    for name, grad in got.items():
        torch.testing.assert_close(grad, leaves[name].grad, rtol=1e-9, atol=1e-9)


def test_rows_with_no_key_output_zero_and_minus_inf():
    spec = {"attncc": 1, "name": "late", "mask": "kv_idx >= 40"}
    q, k, v, _ = random_inputs(spec, 1, 50, 30, "float64", library="torch")
    out, lse = compile_spec(spec, block_m=16, block_n=16)(q, k, v, return_lse=True)
    assert bool((out == 0).all()) and bool(torch.isinf(lse).all())


BAD = [
    (lambda q, k, v, d: (q[0], k, v, d), "q: expected 4 dimensions"),
    (lambda q, k, v, d: (q, k[:, :, :10], v, d), "k: expected shape"),
    (lambda q, k, v, d: (q, k.double(), v, d), "one dtype"),
    (lambda q, k, v, d: (q, k, v, {}), "missing input 'doc'"),
    (lambda q, k, v, d: (q, k, v, {**d, "extra": d["doc"]}), "unexpected input 'extra'"),
    (lambda q, k, v, d: (q, k, v, {"doc": d["doc"].float()}), "doc: expected a int dtype"),
    (lambda q, k, v, d: (q, k, v, {"doc": d["doc"][:, :5]}), "doc: expected shape"),
    (lambda q, k, v, d: (q.numpy(), k, v, d), "takes torch tensors"),
    (lambda q, k, v, d: (q[:, :3], k[:, :2], v[:, :2], d), "must divide"),
]


@pytest.mark.parametrize(("mutate", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_names_the_argument(mutate, message):
    kernel = compile_spec("examples/document_mask.yaml")
    q, k, v, inputs = random_inputs("examples/document_mask.yaml", 2, 20, 20, "float32",
                                    library="torch", heads=4)
    with pytest.raises(InputError, match=message):
        kernel(*mutate(q, k, v, inputs)[:3], **mutate(q, k, v, inputs)[3])


def test_return_lse_refused_where_there_is_none():
    q, k, v, _ = random_inputs("examples/sigmoid.yaml", 1, 8, 8, "float32", library="torch")
    with pytest.raises(InputError, match="return_lse"):
        compile_spec("examples/sigmoid.yaml")(q, k, v, return_lse=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device_mismatch_is_an_input_error():
    q, k, v, _ = random_inputs("examples/causal.yaml", 1, 8, 8, "float32", library="torch")
    with pytest.raises(InputError, match="device"):
        compile_spec("examples/causal.yaml")(q.cuda(), k, v)


class _CopyCounter:
    """A dispatch mode that records, for every op's float output, how many of its elements
    equal an element of ``k`` or of ``v``: a copy of K/V per query head holds each of them
    ``heads`` times (a gather per kv head, once)."""

    def __init__(self, k, v):
        from torch.utils._python_dispatch import TorchDispatchMode

        values = torch.cat([k.flatten(), v.flatten()]).unique()
        found = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                given = {a.untyped_storage().data_ptr() for a in args
                         if isinstance(a, torch.Tensor)}
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if (isinstance(t, torch.Tensor) and t.dtype == values.dtype and t.numel()
                            and t.untyped_storage().data_ptr() not in given):  # views copy nothing
                        found.append((str(func), int(torch.isin(t, values).sum())))
                return out

        self.mode, self.found, self.per_copy = Mode(), found, k.numel() + v.numel()

    def worst(self):
        return max(self.found, key=lambda f: f[1])


@pytest.mark.parametrize("spec,config", [
    ("examples/mqa.json", {"block_m": 16, "block_n": 16}),
    ({"attncc": 1, "name": "mqa_window", "heads": 8, "kv_heads": 1,
      "mask": "kv_idx <= q_idx and q_idx - kv_idx < 24"}, {"use_sdpa": True, "block_m": 16,
                                                            "block_n": 16}),
    ({"attncc": 1, "name": "mqa_memory", "heads": 8, "kv_heads": 1, "memory_tokens": 4}, {}),
    ({"attncc": 1, "name": "mqa_linear", "heads": 8, "kv_heads": 1, "normalize": "linear",
      "feature_map": "relu", "mask": "kv_idx <= q_idx"}, {"chunk": 16}),
    ({"attncc": 1, "name": "mqa_nystrom", "heads": 8, "kv_heads": 1,
      "lowrank": {"method": "nystrom", "landmarks": 4}}, {}),
], ids=["flash", "runs", "memory", "linear", "nystrom"])
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_no_lowering_copies_keys_or_values_per_query_head(spec, config, grad):
    """Every op of forward and backward: no output holds K's or V's elements once per query
    head (MQA: 8 query heads, 1 kv head; one query block, so a legitimate gather holds each
    key once)."""
    spec = attncc.load_spec(spec)
    kernel = compile_spec(spec, **config)
    q, k, v, inputs = random_inputs(spec, 1, 16, 48, "float32", library="torch", head_dim=8,
                                    value_dim=8)
    counter = _CopyCounter(k, v)
    leaves = [x.requires_grad_(grad) for x in (q, k, v)]
    with counter.mode:
        out = kernel(*leaves, **inputs)
        if grad:
            out.sum().backward()
    op, count = counter.worst()
    assert count <= 2 * counter.per_copy, f"{op} holds K/V {count / counter.per_copy:.0f} times"
    torch.testing.assert_close(out.detach().double(),
                               attend(spec, q.detach().double(), k.detach().double(),
                                      v.detach().double(), inputs).double(),
                               rtol=1e-4, atol=1e-4)


def test_the_copy_counter_catches_a_copy():
    k, v = torch.randn(1, 1, 48, 8), torch.randn(1, 1, 48, 8)
    counter = _CopyCounter(k, v)
    with counter.mode:
        k.repeat_interleave(8, 1) @ v.transpose(-1, -2).expand(1, 8, 8, 48)
    assert counter.worst()[1] >= 4 * counter.per_copy


def test_decoding_is_one_fused_call_on_the_cache():
    """Bottom-right causal with GQA (a KV cache): one fused call per step, no copy of the cache
    (the mask a view of a cached buffer), every step against the reference; seq_q > seq_k
    (rows without keys output 0) takes the plan path."""
    spec = "examples/decoding.yaml"
    kernel = compile_spec(spec)
    gen = torch.Generator().manual_seed(5)
    for nq, nk in [(1, 40), (4, 40), (4, 41), (16, 300), (16, 16), (9, 5)]:
        q = torch.randn(2, 8, nq, 16, generator=gen)
        k, v = (torch.randn(2, 2, nk, 16, generator=gen) for _ in range(2))
        with torch.profiler.profile() as prof:
            out = kernel(q, k, v)
        names = {e.name for e in prof.events()}
        want = attend(spec, q.double(), k.double(), v.double(), {})
        torch.testing.assert_close(out.double(), want, atol=2e-6, rtol=1e-5)
        if nq <= nk:
            assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
            assert not names & {"aten::repeat_interleave", "aten::index_select", "aten::clone",
                                "aten::contiguous"}
