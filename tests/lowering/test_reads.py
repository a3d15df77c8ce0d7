"""Input reads in range on the host (``attncc.lowering.reads``): the reference's InputError,
with its message, wherever some (b, h, q_idx, kv_idx) indexes an input outside an axis; never
for the example specs with their inputs."""

from __future__ import annotations

import numpy as np
import pytest

import attncc
from attncc.errors import InputError
from attncc.ir.graph import attention_node
from attncc.lowering import reads
from attncc.passes.pipeline import lower
from attncc.reference import attend
from attncc.testing import example_specs, random_inputs


def _reads(spec):
    return reads.Reads(attention_node(lower(spec))[1])


def _sizes(q, k, spec):
    return {"batch": q.shape[0], "heads": q.shape[1], "kv_heads": k.shape[1],
            "seq_q": q.shape[2], "seq_k": k.shape[2], "head_dim": q.shape[3],
            "value_dim": q.shape[3]}


def _reference_error(spec, q, k, v, inputs) -> str:
    with pytest.raises(InputError) as err:
        attend(spec, q, k, v, inputs)
    return str(err.value)


@pytest.mark.parametrize("seq", [(33, 33), (80, 64)])
@pytest.mark.parametrize("path", example_specs(), ids=lambda p: p.stem)
def test_the_examples_read_in_range(path, seq):
    spec = attncc.load_spec(path)
    _, node = attention_node(lower(spec))
    if not hasattr(node, "score_mod"):  # linear and Nystrom nodes read no input by index
        pytest.skip("not a fused node")
    q, k, v, inputs = random_inputs(spec, 2, *seq, "float64", seed=1)
    attend(spec, q, k, v, inputs)  # the reference takes these inputs
    reads.Reads(node).check(_sizes(q, k, spec), inputs)


REL = {"attncc": 1, "name": "rel", "mask": "kv_idx <= q_idx",
       "score_mod": "score + rel[h, q_idx - kv_idx]",
       "inputs": {"rel": {"shape": ["heads", "seq_q"], "dtype": "float64"}}}
NESTED = {"attncc": 1, "name": "nested", "score_mod": "score + tbl[doc[b, q_idx]]",
          "inputs": {"tbl": {"shape": [4], "dtype": "float64"},
                     "doc": {"shape": ["batch", "seq_q"], "dtype": "int64"}}}
BLOCKS = {"attncc": 1, "name": "blocks", "mask": "rb[q_idx // 16, kv_idx // 16]",
          "inputs": {"rb": {"shape": [3, 3], "dtype": "bool"}}}


def test_an_affine_index_past_the_axis_is_the_references_error():
    """``q_idx - kv_idx`` is negative above the diagonal, where the mask drops the pair: the
    reference still raises, and so does the check, with the same message."""
    spec = attncc.load_spec(REL)
    q, k, v, inputs = random_inputs(spec, 1, 40, 40, "float64", seed=0)
    message = _reference_error(spec, q, k, v, inputs)
    with pytest.raises(InputError, match="indexed outside its axis 1 of size 40") as err:
        _reads(spec).check(_sizes(q, k, spec), inputs)
    assert str(err.value) == message


def test_a_nested_read_is_checked_against_the_inner_values():
    spec = attncc.load_spec(NESTED)
    q, k, v, inputs = random_inputs(spec, 2, 30, 30, "float64", seed=0)
    check = _reads(spec)
    inputs["doc"] = np.arange(60).reshape(2, 30) % 4
    check.check(_sizes(q, k, spec), inputs)
    inputs["doc"][1, 7] = 4  # one id past the table
    message = _reference_error(spec, q, k, v, inputs)
    with pytest.raises(InputError) as err:
        check.check(_sizes(q, k, spec), inputs)
    assert str(err.value) == message


@pytest.mark.parametrize("chunk", [reads.CHUNK, 7])
def test_a_floor_index_is_evaluated_over_its_positions(chunk, monkeypatch):
    """``q_idx // 16`` over 40 rows reaches 2, within 3 blocks; over 50 rows it reaches 3. In
    chunks of rows too (an index reading both positions)."""
    monkeypatch.setattr(reads, "CHUNK", chunk)
    spec = attncc.load_spec(BLOCKS)
    q, k, _, inputs = random_inputs(spec, 1, 40, 40, "float64", seed=0)
    check = _reads(spec)
    check.check(_sizes(q, k, spec), inputs)
    q, k, _, _ = random_inputs(spec, 1, 50, 40, "float64", seed=0)
    with pytest.raises(InputError, match="axis 0 of size 3 by floor"):
        check.check(_sizes(q, k, spec), inputs)
    both = attncc.load_spec({**BLOCKS, "mask": "rb[(q_idx * kv_idx) // 600, 0]"})
    q, k, _, inputs = random_inputs(both, 1, 40, 40, "float64", seed=0)
    _reads(both).check(_sizes(q, k, both), inputs)  # 39 * 39 // 600 = 2
    with pytest.raises(InputError, match="axis 0 of size 2 by floor"):
        _reads(both).check(_sizes(q, k, both), {**inputs, "rb": inputs["rb"][:2]})


def _linformer(rank: int, width: int):
    return attncc.load_spec({"attncc": 1, "name": "lin",
                             "lowrank": {"method": "linformer", "rank": rank},
                             "score_mod": "score + bias[h, kv_idx]",
                             "inputs": {"bias": {"shape": ["heads", width],
                                                 "dtype": "float64"}}})


def test_under_a_projection_kv_idx_runs_over_the_projected_keys():
    """A bias over the 8 projected keys of 32 is in range; one of 16 keys under a rank of 32
    is the reference's error."""
    spec = _linformer(8, 8)
    q, k, v, inputs = random_inputs(spec, 1, 16, 32, "float64", seed=0)
    attend(spec, q, k, v, inputs)
    _reads(spec).check(_sizes(q, k, spec), inputs)
    spec = _linformer(32, 16)
    q, k, v, inputs = random_inputs(spec, 1, 16, 16, "float64", seed=0)
    message = _reference_error(spec, q, k, v, inputs)
    with pytest.raises(InputError) as err:
        _reads(spec).check(_sizes(q, k, spec), inputs)
    assert str(err.value) == message


def test_an_index_read_from_the_score_is_left_to_the_kernel():
    """An index computed from the score raises no false error (the host has no scores)."""
    spec = attncc.load_spec({"attncc": 1, "name": "by_score",
                             "score_mod": "score + tbl[min(max(floor(score), 0), 3)]",
                             "inputs": {"tbl": {"shape": [4], "dtype": "float64"}}})
    q, k, v, inputs = random_inputs(spec, 1, 16, 16, "float64", seed=0)
    attend(spec, q, k, v, inputs)
    _reads(spec).check(_sizes(q, k, spec), inputs)


def test_inputs_numpy_lacks_and_nan_indices():
    """A bfloat16 input beside a nested read is no error; a NaN index is the reference's."""
    torch = pytest.importorskip("torch")
    spec = attncc.load_spec({"attncc": 1, "name": "ids",
                             "score_mod": "score + tbl[h, doc[b, kv_idx]] + rel[floor(pos[b, 0])]",
                             "inputs": {"tbl": {"shape": ["heads", 4], "dtype": "bfloat16"},
                                        "doc": {"shape": ["batch", "seq_k"], "dtype": "int64"},
                                        "rel": {"shape": [4], "dtype": "float32"},
                                        "pos": {"shape": ["batch", 1], "dtype": "float32"}}})
    q, k, _, inputs = random_inputs(spec, 2, 8, 8, "bfloat16", seed=0, library="torch")
    inputs["pos"] = torch.full((2, 1), 1.5)
    check = _reads(spec)
    check.check(_sizes(q, k, spec), inputs)
    inputs["pos"] = torch.full((2, 1), float("nan"))
    with pytest.raises(InputError, match="'rel' is indexed outside its axis 0"):
        check.check(_sizes(q, k, spec), inputs)
