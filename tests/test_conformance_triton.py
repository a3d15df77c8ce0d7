"""The conformance suite for the Triton backend, run under TRITON_INTERPRET=1 (no GPU needed).

Small sizes only (the interpreter is slow): every example spec in float32 with the smallest tiles
(so blocks are FULL, PARTIAL and EMPTY), a few in float64 and with seq_q != seq_k. Forward and
backward are both checked (the kernel has a ``backward``) against the float64 reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Triton decorates its own helpers at import: the interpreter must be on before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from attncc.errors import InputError
from attncc.passes.pipeline import lower
from attncc.reference import reference
from attncc.spec.load import load_spec
from attncc.target import Target
from attncc.testing import check_kernel, example_specs, random_inputs
from attncc_triton import TritonBackend

SLOW = {"topk", "hard_attention"}  # the top-k threshold sort is slow when interpreted
ALL = [p for p in example_specs()]
F64 = {"causal", "relative_bias", "document_mask", "memory_tokens", "additive", "linear_elu"}
RAGGED = {"alibi", "decoding", "prefix_lm", "gqa", "linformer"}
CASES = ([(p, "float32", 1, 16 if p.stem in SLOW else 23, 16 if p.stem in SLOW else 23)
          for p in ALL]
         + [(p, "float64", 2, 19, 19) for p in ALL if p.stem in F64]
         + [(p, "float32", 1, 12, 35) for p in ALL if p.stem in RAGGED]
         + [(p, "float32", 1, 33, 9) for p in ALL if p.stem in {"causal", "decoding"}])


@pytest.mark.parametrize("path,dtype,batch,seq_q,seq_k", CASES,
                         ids=[f"{c[0].stem}-{c[1]}-q{c[3]}-k{c[4]}" for c in CASES])
def test_conformance(path, dtype, batch, seq_q, seq_k):
    spec = load_spec(path)
    backend, target = TritonBackend(), Target.detect("cpu")
    graph = lower(spec)
    support = backend.supports(graph, target)
    if not support:
        pytest.skip(support.reason)
    space = backend.search_space(graph, target)
    smallest = min(space.configs(), key=lambda c: (c.get("block_m", 0) * c.get("block_n", 0)
                                                   * c.get("chunk", 1), c["num_warps"],
                                                   c["num_stages"]))
    kernel = backend.compile(graph, smallest, target)
    q, k, v, inputs = random_inputs(spec, batch, seq_q, seq_k, dtype, 0, "torch")
    try:
        reference(spec, q, k, v, **inputs)
    except InputError as err:
        pytest.skip(f"'{spec.name}' does not take seq_q {seq_q} != seq_k {seq_k}: {err}")
    report = check_kernel(kernel, spec, q, k, v, inputs)
    assert report.ok, str(report)
    assert any(c.quantity == "grad q" for c in report.checks)
