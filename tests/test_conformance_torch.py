"""The shared conformance suite (attncc.testing) on the torch backend: every example spec, float32
and float64, odd sizes, decoding and the smallest tiles; gradients of q, k, v and every floating
input against autograd through the float64 reference. Half precision on a few specs, and CUDA
when a GPU is present."""

import pytest
import torch

from attncc.testing import conformance_cases, example_specs, run_case

CASES = conformance_cases("torch")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case):
    run_case(case)


HALF_SPECS = [p for p in example_specs() if p.stem in ("alibi", "document_mask", "memory_tokens",
                                                        "topk", "linear_elu", "gqa", "sigmoid")]
HALF = conformance_cases("torch", dtypes=("float16", "bfloat16"), specs=HALF_SPECS,
                         sizes=((2, 37, 37, "default"), (2, 24, 77, "smallest")))


@pytest.mark.parametrize("case", HALF, ids=[c.id for c in HALF])
def test_conformance_half(case):
    run_case(case)


CUDA = (conformance_cases("torch", dtypes=("float32", "bfloat16"), device="cuda",
                          sizes=((2, 37, 37, "default"), (2, 24, 77, "smallest")))
        if torch.cuda.is_available() else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", CUDA, ids=[c.id for c in CUDA])
def test_conformance_cuda(case):
    run_case(case)
