"""The conformance suite for the Triton backend, run under TRITON_INTERPRET=1 (no GPU needed).

Small sizes only (the interpreter is slow): every example spec in float32 with the smallest tiles
(so blocks are FULL, PARTIAL and EMPTY), a few in float64 and with seq_q != seq_k, and the
extreme-score family (scores ~1e3, ``attncc.testing.EXTREME_STD``) for every spec whose
normalization exponentiates. Cases a spec cannot take (``unfit_reason``) are not generated; the
backend claims every example spec, so a refusal fails. Forward and backward are both checked (the
kernel has a ``backward``) against the float64 reference.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Triton decorates its own helpers at import: the interpreter must be on before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins"))

from attncc.passes.pipeline import lower
from attncc.spec.load import load_spec
from attncc.target import Target
from attncc.testing import (
    EXTREME_SIZES,
    EXTREME_STD,
    check_kernel,
    example_specs,
    exponentiates,
    random_inputs,
    sizes_for,
    unfit_reason,
)
from attncc_triton import TritonBackend

SLOW = {"topk", "hard_attention"}  # the top-k threshold sort is slow when interpreted
ALL = list(example_specs())
F64 = {"causal", "relative_bias", "document_mask", "memory_tokens", "additive", "linear_elu",
       "nystrom"}
RAGGED = {"alibi", "decoding", "prefix_lm", "gqa", "linformer"}
EXTREME_F64 = {"dense", "alibi", "softcap", "memory_tokens"}


def _square(p) -> int:
    return 16 if p.stem in SLOW else 23


def _cases() -> list[tuple]:
    """(path, dtype, batch, seq_q, seq_k, score_std) of every case the spec can take."""
    cases = ([(p, "float32", 1, _square(p), _square(p), None) for p in ALL]
             + [(p, "float64", 2, 19, 19, None) for p in ALL if p.stem in F64]
             + [(p, "float32", 1, 12, 35, None) for p in ALL if p.stem in RAGGED]
             + [(p, "float32", 1, 33, 9, None) for p in ALL if p.stem in {"causal", "decoding"}])
    for p in ALL:
        if exponentiates(load_spec(p)):
            cases.append((p, "float32", *EXTREME_SIZES[0][:3], EXTREME_STD))
            if p.stem in EXTREME_F64:
                cases.append((p, "float64", 1, 12, 35, EXTREME_STD))
    return [c for c in cases
            if unfit_reason(load_spec(c[0]), sizes_for(load_spec(c[0]), *c[2:5])) is None]


CASES = _cases()


def _id(case) -> str:
    extreme = "-extreme" if case[5] is not None else ""
    return f"{case[0].stem}-{case[1]}-q{case[3]}-k{case[4]}{extreme}"


def test_cases_cover_every_spec_and_family():
    """Every example spec has a case, and the extreme family covers every exponentiating one."""
    assert {c[0].stem for c in CASES} == {p.stem for p in ALL}
    extreme = {c[0].stem for c in CASES if c[5] is not None}
    assert extreme == {p.stem for p in ALL if exponentiates(load_spec(p))}
    assert {"dense", "nystrom"} <= {c[0].stem for c in CASES if c[1] == "float64"}


@pytest.mark.parametrize("path,dtype,batch,seq_q,seq_k,score_std", CASES,
                         ids=[_id(c) for c in CASES])
def test_conformance(path, dtype, batch, seq_q, seq_k, score_std):
    spec = load_spec(path)
    backend, target = TritonBackend(), Target.detect("cpu")
    graph = lower(spec)
    support = backend.supports(graph, target)
    assert support, f"the triton backend refused '{spec.name}': {support.reason}"
    space = backend.search_space(graph, target)
    smallest = min(space.configs(), key=lambda c: (c.get("block_m", 0) * c.get("block_n", 0)
                                                   * c.get("chunk", 1), c["num_warps"],
                                                   c["num_stages"]))
    kernel = backend.compile(graph, smallest, target)
    q, k, v, inputs = random_inputs(spec, batch, seq_q, seq_k, dtype, 0, "torch",
                                    score_std=score_std)
    report = check_kernel(kernel, spec, q, k, v, inputs)
    assert report.ok, str(report)
    assert any(c.quantity == "grad q" for c in report.checks)
