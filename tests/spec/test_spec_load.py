"""Loading specs from YAML, TOML and JSON files, text and dicts, and every error path.

Each error must name where the problem is (file, field, column when inside an expression), what
was expected and what was received.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import sympy
import torch

import attncc
from attncc.spec import symbols as sym
from attncc.spec.schema import KEYS

ALIBI = {
    "attncc": 1, "name": "sliding_alibi", "doc": "Sliding window with ALiBi",
    "heads": 8, "kv_heads": 2, "head_dim": 64, "score_mod": "score - slope[h] * (q_idx - kv_idx)",
    "mask": "kv_idx <= q_idx and q_idx - kv_idx < window", "constants": {"window": 128},
    "inputs": {"slope": {"shape": ["heads"], "dtype": "float32"}},
}
YAML = """\
attncc: 1
name: sliding_alibi
doc: Sliding window with ALiBi
heads: 8
kv_heads: 2
head_dim: 64
score_mod: score - slope[h] * (q_idx - kv_idx)
mask: kv_idx <= q_idx and q_idx - kv_idx < window
constants: {window: 128}
inputs:
  slope: {shape: [heads], dtype: float32}
"""
TOML = """\
attncc = 1
name = "sliding_alibi"
doc = "Sliding window with ALiBi"
heads = 8
kv_heads = 2
head_dim = 64
score_mod = "score - slope[h] * (q_idx - kv_idx)"
mask = "kv_idx <= q_idx and q_idx - kv_idx < window"

[constants]
window = 128

[inputs.slope]
shape = ["heads"]
dtype = "float32"
"""


def expect_error(source, *fragments, field=None, file=None, column=None):
    """Load ``source``, expect a SpecError whose text holds every fragment; return it."""
    with pytest.raises(attncc.SpecError) as info:
        attncc.load_spec(source)
    err = info.value
    text = str(err)
    assert "\n" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    if field is not None:
        assert err.field == field, text
    if file is not None:
        assert err.file == str(file) and text.startswith(str(file)), text
    if column is not None:
        assert err.column == column and f"column {column}" in text, text
    return err


# --- the three formats agree ---------------------------------------------------------------

def test_dict_yaml_toml_json_text_and_files_give_one_spec(tmp_path):
    from_dict = attncc.load_spec(ALIBI)
    (tmp_path / "s.yaml").write_text(YAML)
    (tmp_path / "s.toml").write_text(TOML)
    (tmp_path / "s.json").write_text(json.dumps(ALIBI))
    sources = [YAML, TOML, json.dumps(ALIBI), tmp_path / "s.yaml", str(tmp_path / "s.toml"),
               tmp_path / "s.json"]
    for source in sources:
        spec = attncc.load_spec(source)
        assert spec == from_dict and spec.hash == from_dict.hash, source
    assert attncc.load_spec(from_dict) is from_dict


def test_loaded_fields():
    spec = attncc.load_spec(ALIBI)
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.value_dim) == (8, 2, 64, None)
    assert spec.score == "dot" and spec.normalize == "softmax"
    assert spec.scale == 1 / sympy.sqrt(sym.SIZES["head_dim"])
    assert spec.constants == {"window": 128}
    slope = sympy.IndexedBase("slope", real=True)
    assert spec.score_mod == sym.score - slope[sym.h] * (sym.q_idx - sym.kv_idx)
    assert spec.mask == sympy.And(sym.kv_idx <= sym.q_idx, sym.q_idx - sym.kv_idx < 128)
    assert spec.inputs["slope"].shape == (sym.SIZES["heads"],)
    assert not spec.is_causal
    assert attncc.load_spec({"attncc": 1, "mask": "q_idx >= kv_idx"}).is_causal


def test_file_name_is_the_default_name(tmp_path):
    path = tmp_path / "my_variant.yml"
    path.write_text("attncc: 1\nmask: kv_idx <= q_idx\n")
    spec = attncc.load_spec(path)
    assert spec.name == "my_variant" and spec.file == str(path)


def test_hash_ignores_name_and_doc_but_not_meaning():
    base = attncc.load_spec(ALIBI)
    renamed = attncc.load_spec({**ALIBI, "name": "other", "doc": "other words"})
    assert renamed.hash == base.hash
    spaced = attncc.load_spec({**ALIBI, "mask": "q_idx-kv_idx<window and kv_idx<=q_idx"})
    assert spaced.hash == base.hash
    changed = attncc.load_spec({**ALIBI, "constants": {"window": 64}})
    assert changed.hash != base.hash


def test_implied_inputs_and_their_shapes():
    s = sym.SIZES
    spec = attncc.load_spec({"attncc": 1, "memory_tokens": 3, "score": "additive"})
    assert spec.inputs["mem_k"].shape == (s["kv_heads"], 3, s["head_dim"])
    assert spec.inputs["mem_v"].shape == (s["kv_heads"], 3, s["value_dim"])
    assert spec.inputs["w"].shape == (s["heads"], s["head_dim"])
    assert all(i.implied for i in spec.inputs.values())
    lin = attncc.load_spec({"attncc": 1, "lowrank": {"method": "linformer", "rank": 5}})
    assert lin.inputs["E"].shape == lin.inputs["F"].shape == (5, s["seq_k"])
    perf = attncc.load_spec({"attncc": 1, "normalize": "linear", "feature_map": "performer",
                             "features": 16, "inputs": {"omega": {"shape": [16, "head_dim"],
                                                                  "dtype": "float64"}}})
    assert perf.inputs["omega"].dtype == "float64" and perf.inputs["omega"].implied


@pytest.mark.parametrize("data", [
    {"mask": "kv_idx <= q_idx"},
    {"score_mod": "score * 2", "mask": "doc[q_idx] == doc[kv_idx]",
     "inputs": {"doc": {"shape": ["seq_q"], "dtype": "int32"}}},
    # cancelled by sympy while parsing: declared, written, but never read
    {"mask": "kv_idx <= q_idx + slopes[h] - slopes[h]"},
])
def test_a_declared_input_no_expression_reads_is_an_error(data, tmp_path):
    spec = {"attncc": 1, **data}
    spec["inputs"] = {**spec.get("inputs", {}), "slopes": {"shape": ["heads"]}}
    expect_error(spec, "declared but never read", "expected slopes[...] in mask or score_mod",
                 field="inputs.slopes")
    path = tmp_path / "unused.json"
    path.write_text(json.dumps(spec))
    expect_error(path, "declared but never read", field="inputs.slopes", file=path)


@pytest.mark.parametrize("data", [
    {"score_mod": "score - slope[h]"},
    {"mask": "kv_idx < lengths[table[b]]", "score_mod": "score - slope[h]"},
    {"mask": "kv_idx <= q_idx", "score_mod": "score + slope[table[h]]"},
])
def test_inputs_read_anywhere_count_as_used(data):
    declared = {"slope": {"shape": ["heads"]}, "lengths": {"shape": ["batch"], "dtype": "int32"},
                "table": {"shape": ["heads"], "dtype": "int32"}}
    names = {n for n in declared if f"{n}[" in " ".join(data.values())}
    spec = attncc.load_spec({"attncc": 1, **data, "inputs": {n: declared[n] for n in names}})
    assert set(spec.inputs) == names


def test_declaring_an_implied_input_to_choose_its_dtype_is_a_use():
    spec = attncc.load_spec({"attncc": 1, "score": "additive",
                             "inputs": {"w": {"shape": ["heads", "head_dim"],
                                              "dtype": "float64"}}})
    assert spec.inputs["w"].implied and spec.inputs["w"].dtype == "float64"


def test_bool_input_element_is_a_condition():
    spec = attncc.load_spec({"attncc": 1, "mask": "allowed[q_idx, kv_idx] or kv_idx == 0",
                             "inputs": {"allowed": {"shape": ["seq_q", "seq_k"],
                                                    "dtype": "bool"}}})
    allowed = sympy.IndexedBase("allowed", integer=True)[sym.q_idx, sym.kv_idx]
    assert spec.mask == sympy.Or(sympy.Ne(allowed, 0), sympy.Eq(sym.kv_idx, 0))


# --- file and syntax errors --------------------------------------------------------------------

def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.yaml", "no such file", file=tmp_path / "nope.yaml")


def test_unknown_extension(tmp_path):
    path = tmp_path / "spec.txt"
    path.write_text("attncc: 1\n")
    expect_error(path, "unknown extension '.txt'", ".yaml", file=path)


@pytest.mark.parametrize(("name", "text", "fragments"), [
    ("bad.yaml", "attncc: 1\nmask: [kv_idx\n", ["not valid YAML", "line 3, column 1"]),
    ("bad.toml", "attncc = 1\nmask = \n", ["not valid TOML", "line 2, column 8"]),
    ("bad.json", '{"attncc": 1,\n "mask": }', ["not valid JSON", "line 2, column 10"]),
    ("dup.yaml", "attncc: 1\nmask: kv_idx <= q_idx\nmask: true\n",
     ["duplicate key 'mask'", "line 3, column 1"]),
])
def test_syntax_errors_give_line_and_column(tmp_path, name, text, fragments):
    path = tmp_path / name
    path.write_text(text)
    expect_error(path, *fragments, file=path)


def test_syntax_errors_in_text():
    expect_error("attncc: 1\nmask: [", "not valid YAML", "line 2, column 8")
    expect_error('{"attncc": 1', "not valid JSON", "line 1, column 13")
    expect_error("attncc = 1\nmask = [", "not valid TOML")


def test_not_a_mapping_or_a_source():
    expect_error("- 1\n- 2\n", "expected a mapping of spec keys, got list")
    expect_error(42, "expected a path, spec text, a dict or a Spec, got int")


# --- schema errors -----------------------------------------------------------------------------

def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("attncc: 1\nmaks: kv_idx <= q_idx\n")
    expect_error(path, "unknown key", "did you mean 'mask'?", field="maks", file=path)
    expect_error({"attncc": 1, "zzzz": 1}, "unknown key", "expected one of: attncc", field="zzzz")


@pytest.mark.parametrize(("version", "fragment"), [
    (2, "format version 2 is not supported; expected 1"),
    (True, "format version True is not supported"),
    ("1", "format version '1' is not supported"),
    (1.5, "format version 1.5"),
])
def test_wrong_version(version, fragment):
    expect_error({"attncc": version}, fragment, field="attncc")


def test_missing_version():
    expect_error({"name": "x"}, "missing the format version; expected 'attncc: 1'",
                 field="attncc")


@pytest.mark.parametrize(("data", "field", "fragments"), [
    ({"normalize": "softmx"}, "normalize", ["expected one of softmax", "got 'softmx'",
                                            "did you mean 'softmax'?"]),
    ({"score": "dott"}, "score", ["expected one of dot, additive", "got 'dott'"]),
    ({"normalize": "linear", "feature_map": "perfomer"}, "feature_map", ["got 'perfomer'",
                                                                     "did you mean 'performer'?"]),
    ({"heads": 0}, "heads", ["expected an integer >= 1, got 0"]),
    ({"heads": True}, "heads", ["expected an integer >= 1, got True"]),
    ({"head_dim": "64"}, "head_dim", ["expected an integer >= 1, got '64'"]),
    ({"heads": 8, "kv_heads": 3}, "kv_heads", ["kv_heads (3) must divide heads (8)"]),
    ({"name": "a b"}, "name", ["expected an identifier", "got 'a b'"]),
    ({"doc": 3}, "doc", ["expected text, got int"]),
    ({"constants": {"a": "x"}}, "constants.a", ["expected a number, got 'x'"]),
    ({"constants": {"heads": 2}}, "constants.heads", ["'heads' is a reserved name"]),
    ({"constants": [1]}, "constants", ["expected a mapping of names to numbers"]),
    ({"lowrank": {"method": "svd"}}, "lowrank", ["expected {method: linformer, rank: R}",
                                                 "got {'method': 'svd'}"]),
    ({"lowrank": {"method": "nystrom", "rank": 4}}, "lowrank.rank",
     ["unknown key for nystrom", "expected method and landmarks"]),
    ({"lowrank": {"method": "linformer", "rank": 0}}, "lowrank.rank",
     ["expected an integer >= 1, got 0"]),
])
def test_bad_values(data, field, fragments):
    expect_error({"attncc": 1, **data}, *fragments, field=field)


@pytest.mark.parametrize(("inputs", "field", "fragments"), [
    ([1], "inputs", ["expected a mapping of input names"]),
    ({"x": [1]}, "inputs.x", ["expected {shape: [...], dtype: ...}, got [1]"]),
    ({"x": {"dtype": "float32"}}, "inputs.x", ["expected {shape: [...], dtype: ...}"]),
    ({"x": {"shape": ["heads"], "dtpe": "bool"}}, "inputs.x.dtpe",
     ["unknown key", "did you mean 'dtype'?"]),
    ({"x": {"shape": ["heads"], "dtype": "float33"}}, "inputs.x.dtype",
     ["expected one of float16", "got 'float33'", "did you mean 'float32'?"]),
    ({"x": {"shape": "heads"}}, "inputs.x.shape", ["expected a list of sizes ([] for a scalar)"]),
    ({"x": {"shape": [0]}}, "inputs.x.shape", ["expected a positive integer size, got 0"]),
    ({"x": {"shape": [-3]}}, "inputs.x.shape", ["expected a positive integer size, got -3"]),
    ({"x": {"shape": [2.5]}}, "inputs.x.shape", ["expected a positive integer size, got 2.5"]),
    ({"x": {"shape": ["seq_q / 2"]}}, "inputs.x.shape", ["expected a positive integer size"]),
    ({"x": {"shape": [True]}}, "inputs.x.shape", ["expected a positive integer size"]),
    ({"x": {"shape": ["seq_len"]}}, "inputs.x.shape", ["unknown name 'seq_len'", "seq_q"]),
    ({"seq_q": {"shape": [1]}}, "inputs.seq_q", ["'seq_q' is a reserved name"]),
    ({"sqrt": {"shape": [1]}}, "inputs.sqrt", ["'sqrt' is a reserved name"]),
    ({"1x": {"shape": [1]}}, "inputs", ["expected an identifier as a name, got '1x'"]),
    ({"lambda": {"shape": [1]}}, "inputs", ["expected an identifier as a name, got 'lambda'"]),
])
def test_bad_input_declarations(inputs, field, fragments):
    expect_error({"attncc": 1, "inputs": inputs}, *fragments, field=field)


def test_input_clashing_with_a_constant_or_an_implied_input():
    expect_error({"attncc": 1, "constants": {"w": 1}, "inputs": {"w": {"shape": [1]}}},
                 "'w' is already a constant", field="inputs.w")
    expect_error({"attncc": 1, "memory_tokens": 2, "inputs": {"mem_k": {"shape": [1]}}},
                 "implied with shape [kv_heads, 2, head_dim]; got [1]", field="inputs.mem_k")


@pytest.mark.parametrize(("data", "field", "fragments"), [
    ({"topk": 3}, "topk", ["expected topk: K together with normalize: topk",
                           "got normalize: softmax, topk: 3"]),
    ({"normalize": "topk"}, "topk", ["got normalize: topk, topk: None"]),
    ({"feature_map": "relu"}, "feature_map", ["only with normalize: linear",
                                              "got normalize: softmax"]),
    ({"normalize": "linear", "features": 8}, "features", ["feature_map: performer",
                                                          "got feature_map: elu1, features: 8"]),
    ({"normalize": "linear", "feature_map": "performer"}, "features",
     ["got feature_map: performer, features: None"]),
    ({"normalize": "linear", "mask": "kv_idx < q_idx"}, "mask",
     ["exactly 'kv_idx <= q_idx'", "got kv_idx < q_idx"]),
    ({"normalize": "linear", "score_mod": "score * 2"}, "score_mod",
     ["normalize: linear does not support score_mod", "got score_mod: 'score * 2'"]),
    ({"normalize": "linear", "score": "additive"}, "score", ["got score: 'additive'"]),
    ({"normalize": "linear", "memory_tokens": 2}, "memory_tokens", ["got memory_tokens: 2"]),
    ({"normalize": "linear", "lowrank": {"method": "linformer", "rank": 4}}, "lowrank",
     ["normalize: linear does not support lowrank"]),
    ({"lowrank": {"method": "linformer", "rank": 4}, "mask": "kv_idx <= q_idx"}, "mask",
     ["lowrank: linformer allows no mask"]),
    ({"lowrank": {"method": "linformer", "rank": 4}, "memory_tokens": 2}, "memory_tokens",
     ["allows no memory tokens; got memory_tokens: 2"]),
    ({"lowrank": {"method": "nystrom", "landmarks": 4}, "normalize": "sigmoid"}, "normalize",
     ["nystrom takes score: dot, normalize: softmax", "got normalize: 'sigmoid'"]),
    ({"lowrank": {"method": "nystrom", "landmarks": 4}, "score_mod": "score"}, "score_mod",
     ["nystrom takes"]),
])
def test_refused_combinations(data, field, fragments):
    expect_error({"attncc": 1, **data}, *fragments, field=field)


# --- expression errors are located ------------------------------------------------------------

def test_expression_error_in_a_file_names_file_field_and_column(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("attncc: 1\nmask: kv_idx <= q_idx and foo\n")
    expect_error(path, "unknown name 'foo'", "expected one of: b, batch", file=path,
                 field="mask", column=21)


@pytest.mark.parametrize(("data", "field", "column", "fragment"), [
    ({"mask": "q_idx + 1"}, "mask", 1, "expected a condition (true or false), got the number"),
    ({"score_mod": "q_idx < 3"}, "score_mod", 1, "expected a number, got the condition"),
    ({"mask": "score > 0"}, "mask", 1, "unknown name 'score'"),
    ({"scale": "1/0"}, "scale", 1, "division by zero"),
    ({"scale": "q_idx"}, "scale", 1, "unknown name 'q_idx'"),
    ({"scale": ""}, "scale", None, "expected an expression, got empty text"),
    ({"scale": [1]}, "scale", None, "expected an expression (text or a number), got list"),
])
def test_expression_errors_are_located(data, field, column, fragment):
    err = expect_error({"attncc": 1, **data}, fragment, field=field)
    assert err.column == column


def test_every_schema_key_is_accepted():
    """KEYS lists exactly what the validator accepts: a spec using every key loads."""
    data = {"attncc": 1, "name": "all", "doc": "every key", "heads": 4, "kv_heads": 2,
            "head_dim": 8, "value_dim": 16, "scale": 0.5, "score": "dot",
            "score_mod": "score * c", "mask": "kv_idx <= q_idx + t[0]", "normalize": "topk",
            "topk": 2, "memory_tokens": 1, "constants": {"c": 2},
            "inputs": {"t": {"shape": [4], "dtype": "int32"}}}
    spec = attncc.load_spec(data)
    assert spec.value_dim == 16 and spec.topk == 2 and spec.memory_tokens == 1
    linear = {"normalize": "linear", "feature_map": "performer", "features": 4}
    lowrank = {"lowrank": {"method": "nystrom", "landmarks": 2}}
    assert set(data) | set(linear) | set(lowrank) == set(KEYS)
    assert attncc.load_spec({"attncc": 1, **linear}).features == 4
    assert attncc.load_spec({"attncc": 1, **lowrank}).lowrank.size == 2


@pytest.mark.parametrize("text, message", [
    ("attncc: 1\nconstants: &a {x: 1}\ninputs: *a\n", "aliases"),
    ("? [a]\n: 1\n", "keys must be plain names"),
])
def test_yaml_bombs_and_complex_keys_are_spec_errors(text, message):
    with pytest.raises(attncc.SpecError, match=message):
        attncc.load_spec(text)


def test_spec_keys_are_sizes_in_input_shapes():
    """``features``, ``topk`` and ``memory_tokens`` in an input's shape are the spec's values
    (``rank`` and ``landmarks`` too, for methods whose implied inputs read them)."""
    base = {"attncc": 1, "heads": 2, "head_dim": 8}
    top = attncc.load_spec({**base, "normalize": "topk", "topk": 3, "score_mod":
                            "score + t[h, kv_idx % 3]", "inputs": {"t": {"shape": ["heads",
                                                                                   "topk"]}}})
    assert top.inputs["t"].shape == (sym.SIZES["heads"], 3)
    mem = attncc.load_spec({**base, "memory_tokens": 2, "score_mod": "score + t[kv_idx + 2]",
                            "inputs": {"t": {"shape": ["memory_tokens + seq_k"]}}})
    assert mem.inputs["t"].shape == (sym.SIZES["seq_k"] + 2,)
    perf = attncc.load_spec({**base, "normalize": "linear", "feature_map": "performer",
                             "features": 16, "inputs": {"omega": {"shape": ["features",
                                                                            "head_dim"]}}})
    assert perf.inputs["omega"].shape == (16, sym.SIZES["head_dim"])
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, n, 8)) for n in (5, 7, 7))
    t = rng.standard_normal((2, 3))
    out = attncc.compile(top, backend="numpy", dtype="float64")(q, k, v, t=t)
    got = attncc.compile(top, backend="torch", dtype="float64")(
        *(torch.from_numpy(x) for x in (q, k, v)), t=torch.from_numpy(t))
    np.testing.assert_allclose(got.numpy(), out, atol=1e-12)
    with pytest.raises(attncc.InputError):
        attncc.compile(top, backend="numpy", dtype="float64")(q, k, v, t=t[:, :2])
