"""The shared conformance suite (attncc.testing) on the torch backend: every example spec in
float32, float64, float16 and bfloat16, forward and backward (gradients of q, k, v and every
floating input against autograd through the float64 reference), odd sizes, decoding, the
smallest tiles, and the extreme-score family (scores ~±1e3 before softmax). Other dtypes run
fewer sizes than float32 (a case costs ~0.3 s). CUDA too when a GPU is present.

The torch backend claims every spec in every dtype, so a refusal by ``supports()`` fails here
(``refusals="fail"``) instead of skipping.
"""

import pytest
import torch

from attncc.passes.pipeline import lower
from attncc.target import Target
from attncc.testing import conformance_cases, example_specs, run_case
from attncc_torch import TorchBackend

# Sizes per dtype, chosen so the file stays near a minute on two CPU cores: one token, more
# queries than keys, decoding (fewer queries than keys) and the smallest tiles (many FULL,
# PARTIAL and EMPTY blocks) in float32; fewer in the other dtypes; extreme scores in float32
# and float16 (float16's eager yardstick is the slow one on CPU).
SMALLEST, DECODE, TALL = (2, 37, 37, "smallest"), (2, 24, 77, "smallest"), (1, 61, 19, "default")
CASES = (conformance_cases("torch", ("float32",), sizes=((1, 1, 1, "default"), SMALLEST, DECODE,
                                                         TALL), extreme_sizes=(DECODE,))
         + conformance_cases("torch", ("float64",), sizes=(SMALLEST, TALL), extreme_sizes=()))
HALF = (conformance_cases("torch", ("float16",), sizes=(SMALLEST,),
                          extreme_sizes=((2, 37, 37, "default"),))
        + conformance_cases("torch", ("bfloat16",), sizes=(TALL,), extreme_sizes=()))


def test_every_spec_runs_in_every_dtype_with_extreme_scores():
    specs = {p.stem for p in example_specs()}
    for dtype in ("float32", "float64", "float16", "bfloat16"):
        covered = {c.spec_path.rsplit("/", 1)[-1].split(".")[0] for c in CASES + HALF
                   if c.dtype == dtype}
        assert covered == specs, dtype
    extreme = {c.id.split("-")[0] for c in CASES if c.score_std}
    assert {"dense", "softcap", "sigmoid", "topk", "additive", "memory_tokens"} <= extreme
    # document_mask indexes doc [batch, seq_q] by kv_idx: no seq_k > seq_q case is generated
    assert not [c for c in CASES if "document_mask" in c.id and c.seq_k > c.seq_q]


def test_the_backend_supports_every_spec():
    backend, target = TorchBackend(), Target.detect("cpu")
    for path in example_specs():
        assert backend.supports(lower(path), target), path.stem


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_conformance(case):
    run_case(case, refusals="fail")


@pytest.mark.parametrize("case", HALF, ids=[c.id for c in HALF])
def test_conformance_half(case):
    run_case(case, refusals="fail")


CUDA = (conformance_cases("torch", dtypes=("float32", "bfloat16"), device="cuda",
                          sizes=((2, 37, 37, "default"), (2, 24, 77, "smallest")))
        if torch.cuda.is_available() else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("case", CUDA, ids=[c.id for c in CUDA])
def test_conformance_cuda(case):
    run_case(case, refusals="fail")
