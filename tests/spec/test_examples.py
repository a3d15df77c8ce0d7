"""Every spec in examples/ loads, says what it is, and runs through the float64 reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import sympy
from spec_inputs import random_case

import attncc
from attncc.spec.load import EXTENSIONS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SPEC_FILES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in EXTENSIONS)

#: The variants the issue asks for, by file stem; each must have its own example.
VARIANTS = {
    "dense", "causal", "sliding_window", "dilated_window", "prefix_lm", "document_mask",
    "key_padding", "decoding", "longformer", "bigbird", "sparse_strided", "sparse_fixed", "alibi",
    "softcap", "relative_bias", "gqa", "mqa", "topk", "hard_attention", "additive", "sigmoid",
    "linear_elu", "performer", "linformer", "nystrom", "memory_tokens", "attention_sinks",
}
#: Cross-attention shapes (seq_q != seq_k) for the variants whose meaning is about them.
CROSS = {"key_padding": (8, 24), "decoding": (4, 20)}


def test_every_variant_has_an_example():
    assert VARIANTS <= {p.stem for p in SPEC_FILES}


def test_all_three_formats_are_used():
    assert {p.suffix for p in SPEC_FILES} >= {".yaml", ".toml", ".json"}


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_example_loads_with_name_and_doc(path):
    spec = attncc.load_spec(path)
    assert spec.name == path.stem
    assert spec.doc.strip() and "\n" not in spec.doc
    assert spec.file == str(path)
    again = attncc.load_spec(path.read_text())
    assert again.hash == spec.hash


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.name)
def test_example_runs_through_the_reference(path):
    spec = attncc.load_spec(path)
    seq_q, seq_k = CROSS.get(spec.name, (32, 32))
    case = random_case(spec, seq_q=seq_q, seq_k=seq_k)
    out = attncc.reference(spec, case.q, case.k, case.v, **case.inputs)
    s = case.sizes
    assert out.shape == (s["batch"], s["heads"], s["seq_q"], s["value_dim"])
    assert out.dtype == np.float64
    assert np.all(np.isfinite(out))
    if spec.normalize in ("softmax", "topk") and spec.lowrank is None:
        out2, lse = attncc.reference(spec, case.q, case.k, case.v, return_lse=True,
                                     **case.inputs)
        np.testing.assert_array_equal(out, out2)
        assert lse.shape == out.shape[:-1]


def test_masked_examples_mask_something():
    """At the test sizes every mask removes some pairs: the same spec without its mask differs,
    so the constants (windows, strides) are small enough for the tests to mean something."""
    for path in SPEC_FILES:
        spec = attncc.load_spec(path)
        if spec.mask is None:
            continue
        unmasked = {key: value for key, value in spec.source.items() if key != "mask"}
        # inputs only the mask reads go with it (a declared input nothing reads is an error)
        mod = spec.score_mod if spec.score_mod is not None else sympy.S.Zero
        kept = {str(e.base.label) for e in mod.atoms(sympy.Indexed)}
        unmasked["inputs"] = {n: d for n, d in spec.source.get("inputs", {}).items() if n in kept}
        seq_q, seq_k = CROSS.get(spec.name, (64, 64))
        case = random_case(spec, seq_q=seq_q, seq_k=seq_k, seed=1)
        out = attncc.reference(spec, case.q, case.k, case.v, **case.inputs)
        free_inputs = {n: x for n, x in case.inputs.items()
                       if n in attncc.load_spec(unmasked).inputs}
        free = attncc.reference(unmasked, case.q, case.k, case.v, **free_inputs)
        assert not np.allclose(out, free), path.name
