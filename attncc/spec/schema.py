"""The validated spec model (format version 1) and the validation that builds it from a dict.

``KEYS`` is the schema's table of contents: every top-level key with a one-line meaning.
docs/spec.md documents each of them and a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import keyword
from dataclasses import dataclass, field
from functools import cached_property

import sympy

from attncc.errors import SpecError
from attncc.spec import symbols as sym
from attncc.spec.expr import FUNCTIONS, Scope, parse_expr

FORMAT_VERSION = 1

KEYS = {
    "attncc": "format version; must be 1",
    "name": "identifier of the variant (letters, digits, _ and -)",
    "doc": "one line saying what the variant is",
    "heads": "number of query heads (default: taken from q at call time)",
    "kv_heads": "number of key/value heads; divides heads (default: heads)",
    "head_dim": "query/key head dimension (default: taken from q at call time)",
    "value_dim": "value head dimension (default: head_dim)",
    "scale": "expression multiplying q.k for score: dot (default 1/sqrt(head_dim))",
    "score": "dot | additive",
    "score_mod": "expression rewriting the score; reads score, b, h, q_idx, kv_idx",
    "mask": "condition on b, h, q_idx, kv_idx; false removes the pair",
    "normalize": "softmax | sigmoid | topk | linear",
    "topk": "K, the number of largest scores kept per row (with normalize: topk)",
    "feature_map": "elu1 | relu | performer (with normalize: linear)",
    "features": "number of random features M (with feature_map: performer)",
    "lowrank": "{method: linformer, rank: R} or {method: nystrom, landmarks: M}",
    "memory_tokens": "number of learned key/value tokens prepended to every sequence",
    "constants": "mapping of names to numbers usable in every expression",
    "inputs": "runtime tensors named in expressions: {name: {shape: [...], dtype: ...}}",
}
INPUT_KEYS = {"shape": "list of sizes: integers, size names, constants, the spec's features, "
                       "rank, landmarks, topk, memory_tokens, or integer expressions; [] for a "
                       "scalar",
              "dtype": "float16 | bfloat16 | float32 | float64 | int32 | int64 | bool"}
LOWRANK_KEYS = {"method": "linformer | nystrom", "rank": "projected length R (linformer)",
                "landmarks": "number of landmarks M (nystrom)"}

SCORES = ("dot", "additive")
NORMALIZERS = ("softmax", "sigmoid", "topk", "linear")
FEATURE_MAPS = ("elu1", "relu", "performer")
LOWRANK_METHODS = {"linformer": "rank", "nystrom": "landmarks"}
DTYPES = ("float16", "bfloat16", "float32", "float64", "int32", "int64", "bool")
#: Spec keys whose value an input's shape may name (``omega: {shape: [features, head_dim]}``).
SHAPE_KEYS = ("features", "rank", "landmarks", "topk", "memory_tokens")
RESERVED = (set(sym.INDEX_SYMBOLS) | set(sym.SIZE_NAMES) | set(FUNCTIONS) | set(SHAPE_KEYS)
            | {"score", "q", "k", "v", "return_lse", "True", "False", "inf"})

CAUSAL = sympy.Le(sym.kv_idx, sym.q_idx)


@dataclass(frozen=True)
class InputSpec:
    """A runtime tensor: ``shape`` entries are integer sympy expressions of the sizes."""

    name: str
    shape: tuple[sympy.Expr, ...]
    dtype: str
    implied: bool = False

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("float", "bfloat"))


@dataclass(frozen=True)
class LowRank:
    """``method`` is linformer (``size`` = rank) or nystrom (``size`` = landmarks)."""

    method: str
    size: int


@dataclass(frozen=True, eq=False)
class Spec:
    """A validated attention spec. Build it with ``attncc.load_spec``; it is immutable.

    Sizes left ``None`` (heads, kv_heads, head_dim, value_dim) are taken from the tensors at
    call time. Expressions are sympy objects over ``attncc.spec.symbols``.
    """

    name: str
    doc: str
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    value_dim: int | None
    scale: sympy.Expr
    score: str
    score_mod: sympy.Expr | None
    mask: sympy.Basic | None
    normalize: str
    topk: int | None
    feature_map: str | None
    features: int | None
    lowrank: LowRank | None
    memory_tokens: int
    constants: dict[str, int | float]
    inputs: dict[str, InputSpec]
    source: dict = field(repr=False)
    file: str | None = field(default=None, repr=False)

    @cached_property
    def hash(self) -> str:
        """sha256 (hex, 16 chars) of the canonical spec: equal for specs that mean the same."""
        canon = {k: v for k, v in self.source.items() if k not in ("doc", "name")}
        for key in ("scale", "score_mod", "mask"):
            value = getattr(self, key)
            canon[key] = None if value is None else sympy.srepr(value)
        text = json.dumps(canon, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def is_causal(self) -> bool:
        """True when the mask is exactly ``kv_idx <= q_idx``."""
        return _is_causal(self.mask)

    def __eq__(self, other) -> bool:
        return isinstance(other, Spec) and self.hash == other.hash and self.name == other.name

    def __hash__(self) -> int:
        return hash((self.name, self.hash))


def validate(data, *, file: str | None = None) -> Spec:
    """Build a Spec from a dict of plain values; SpecError names the file and field on failure."""
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping of spec keys, got {type(data).__name__}", file=file)
    return _Validator(data, file).run()


class _Validator:
    def __init__(self, data: dict, file: str | None):
        self.data = data
        self.file = file

    def fail(self, field: str | None, message: str):
        raise SpecError(message, file=self.file, field=field)

    def run(self) -> Spec:
        d = self.data
        for key in d:
            if key not in KEYS:
                self.fail(str(key), "unknown key" + (_suggest(key, KEYS) or
                                                     "; expected one of: " + ", ".join(KEYS)))
        version = d.get("attncc")
        if version is None:
            self.fail("attncc", "missing the format version; expected 'attncc: 1'")
        if isinstance(version, bool) or version != FORMAT_VERSION or not isinstance(version, int):
            self.fail("attncc", f"format version {version!r} is not supported; expected 1")
        name = d.get("name", "spec")
        if not isinstance(name, str) or not name.replace("_", "a").replace("-", "a").isalnum():
            self.fail("name", f"expected an identifier (letters, digits, _ and -), got {name!r}")
        doc = d.get("doc", "")
        if not isinstance(doc, str):
            self.fail("doc", f"expected text, got {type(doc).__name__}")
        heads = self.count("heads", None)
        kv_heads = self.count("kv_heads", None)
        if heads is not None and kv_heads is not None and heads % kv_heads:
            self.fail("kv_heads", f"kv_heads ({kv_heads}) must divide heads ({heads})")
        head_dim = self.count("head_dim", None)
        value_dim = self.count("value_dim", None)
        constants = self.constants()
        base = {**sym.SIZES, **{k: sympy.sympify(v) for k, v in constants.items()}}
        score = self.choice("score", SCORES, "dot")
        normalize = self.choice("normalize", NORMALIZERS, "softmax")
        lowrank = self.lowrank()
        memory_tokens = self.count("memory_tokens", 0)
        features = self.count("features", None)
        topk = self.count("topk", None)
        feature_map = self.choice("feature_map", FEATURE_MAPS, "elu1" if normalize == "linear"
                                  else None)
        keys = {"features": features, "topk": topk, "memory_tokens": memory_tokens or None,
                LOWRANK_METHODS[lowrank.method] if lowrank else "rank":
                    lowrank.size if lowrank else None}
        shaped = {**base, **{k: sympy.Integer(v) for k, v in keys.items() if v is not None}}
        inputs = self.inputs(shaped, score, lowrank, memory_tokens, feature_map, features)
        scale = self.expression("scale", Scope(names=base), default="1/sqrt(head_dim)")
        fixed = {sym.SIZES[k]: v for k, v in (("heads", heads), ("kv_heads", kv_heads),
                                              ("head_dim", head_dim), ("value_dim", value_dim))
                 if v is not None}
        indexed = Scope(names={**base, **sym.INDEX_SYMBOLS},
                        inputs={n: (len(i.shape), not i.is_float) for n, i in inputs.items()
                                if not i.implied},
                        booleans=frozenset(n for n, i in inputs.items() if i.dtype == "bool"),
                        trailing={n: sympy.sympify(i.shape[-1]).subs(fixed)
                                  for n, i in inputs.items() if i.shape and not i.implied})
        mask = self.expression("mask", indexed, want="bool")
        score_mod = self.expression("score_mod", dataclasses.replace(
            indexed, names={**indexed.names, "score": sym.score}, infinite=True,
            reductions=True))
        self.used(inputs, mask, score_mod)
        self.combinations(normalize, topk, feature_map, features, score, score_mod, mask,
                          lowrank, memory_tokens)
        return Spec(name=name, doc=doc, heads=heads, kv_heads=kv_heads,
                    head_dim=head_dim, value_dim=value_dim, scale=scale, score=score,
                    score_mod=score_mod, mask=mask, normalize=normalize, topk=topk,
                    feature_map=feature_map if normalize == "linear" else None,
                    features=features, lowrank=lowrank, memory_tokens=memory_tokens,
                    constants=constants, inputs=inputs, source=_plain(d), file=self.file)

    def expression(self, key: str, scope: Scope, default=None, want: str = "number"):
        """The parsed expression under ``key``, or of ``default`` when the key is absent; None
        for an absent or null key without a default."""
        text = self.data.get(key, default)
        if text is None and default is None:
            return None
        return parse_expr(text, scope, field=key, file=self.file, want=want)

    def count(self, key, default):
        value = self.data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self.fail(key, f"expected an integer >= 1, got {value!r}")
        return value

    def choice(self, key, options, default):
        value = self.data.get(key, default)
        if value is not None and value not in options:
            self.fail(key, f"expected one of {', '.join(options)}, got {value!r}"
                           + _suggest(value, options))
        return value

    def constants(self) -> dict:
        raw = self.data.get("constants") or {}
        if not isinstance(raw, dict):
            self.fail("constants", f"expected a mapping of names to numbers, got {raw!r}")
        for key, value in raw.items():
            self.check_name("constants", key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(f"constants.{key}", f"expected a number, got {value!r}")
        return dict(raw)

    def check_name(self, where: str, name) -> None:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            self.fail(where, f"expected an identifier as a name, got {name!r}")
        if name in RESERVED:
            self.fail(f"{where}.{name}", f"'{name}' is a reserved name")

    def lowrank(self) -> LowRank | None:
        raw = self.data.get("lowrank")
        if raw is None:
            return None
        if not isinstance(raw, dict) or raw.get("method") not in LOWRANK_METHODS:
            self.fail("lowrank", "expected {method: linformer, rank: R} or "
                                 f"{{method: nystrom, landmarks: M}}, got {raw!r}")
        size_key = LOWRANK_METHODS[raw["method"]]
        extra = set(raw) - {"method", size_key}
        if extra:
            self.fail(f"lowrank.{sorted(extra)[0]}", f"unknown key for {raw['method']}; "
                                                     f"expected method and {size_key}")
        size = raw.get(size_key)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            self.fail(f"lowrank.{size_key}", f"expected an integer >= 1, got {size!r}")
        return LowRank(raw["method"], size)

    def inputs(self, base, score, lowrank, memory_tokens, feature_map, features) -> dict:
        raw = self.data.get("inputs") or {}
        if not isinstance(raw, dict):
            self.fail("inputs", f"expected a mapping of input names to {{shape, dtype}}, got "
                                f"{raw!r}")
        result = {}
        for name, decl in raw.items():
            self.check_name("inputs", name)
            if name in base:
                self.fail(f"inputs.{name}", f"'{name}' is already a constant or size")
            where = f"inputs.{name}"
            if not isinstance(decl, dict) or "shape" not in decl:
                self.fail(where, f"expected {{shape: [...], dtype: ...}}, got {decl!r}")
            for key in decl:
                if key not in INPUT_KEYS:
                    self.fail(f"{where}.{key}", "unknown key" + _suggest(key, INPUT_KEYS))
            shape = decl["shape"]
            if not isinstance(shape, list):
                self.fail(f"{where}.shape", f"expected a list of sizes ([] for a scalar), got "
                                            f"{shape!r}")
            dims = tuple(self.dim(f"{where}.shape", entry, base) for entry in shape)
            dtype = decl.get("dtype", "float32")
            if dtype not in DTYPES:
                self.fail(f"{where}.dtype", f"expected one of {', '.join(DTYPES)}, got "
                                            f"{dtype!r}" + _suggest(dtype, DTYPES))
            result[name] = InputSpec(name, dims, dtype)
        for name, shape in _implied_inputs(score, lowrank, memory_tokens, feature_map,
                                           features).items():
            declared = result.get(name)
            if declared is not None and len(declared.shape) != len(shape):
                self.fail(f"inputs.{name}", f"this input is implied with shape "
                                            f"{list(shape)}; got {list(declared.shape)}")
            dtype = declared.dtype if declared else "float32"
            result[name] = InputSpec(name, shape, dtype, implied=True)
        return result

    def used(self, inputs: dict, mask, score_mod) -> None:
        """Refuse a declared input that no expression reads: a kernel would require a tensor it
        never looks at, and a misspelt name would go unnoticed. Implied inputs are read by their
        feature, so declaring one (to choose its dtype) is always a use."""
        read = {str(e.base.label) for expr in (mask, score_mod) if expr is not None
                for e in expr.atoms(sympy.Indexed)}
        for name, decl in inputs.items():
            if not decl.implied and name not in read:
                self.fail(f"inputs.{name}", f"declared but never read; expected {name}[...] "
                                            "in mask or score_mod (after simplification), or "
                                            "no declaration")

    def dim(self, where, entry, base) -> sympy.Expr:
        value = parse_expr(entry, Scope(names=base), field=where, file=self.file)
        if value.is_integer is not True or value.is_positive is False:
            self.fail(where, f"expected a positive integer size, got {entry!r}")
        return value

    def combinations(self, normalize, topk, feature_map, features, score, score_mod, mask,
                     lowrank, memory_tokens) -> None:
        """Refuse the combinations DESIGN §3 does not define, saying what was received."""
        if (normalize == "topk") != (topk is not None):
            self.fail("topk", "expected topk: K together with normalize: topk and only with it; "
                              f"got normalize: {normalize}, topk: {topk}")
        if feature_map is not None and normalize != "linear":
            self.fail("feature_map", "expected feature_map only with normalize: linear; got "
                                     f"normalize: {normalize}")
        if (feature_map == "performer") != (features is not None):
            self.fail("features", "expected features: M together with feature_map: performer "
                                  f"and only with it; got feature_map: {feature_map}, "
                                  f"features: {features}")
        if normalize == "linear":
            if mask is not None and not _is_causal(mask):
                self.fail("mask", "normalize: linear allows no mask or exactly "
                                  f"'kv_idx <= q_idx'; got {mask}")
            for key, bad in (("score_mod", score_mod is not None), ("score", score != "dot"),
                             ("lowrank", lowrank is not None),
                             ("memory_tokens", memory_tokens > 0)):
                if bad:
                    self.fail(key, f"normalize: linear does not support {key}; got "
                                   f"{key}: {self.data.get(key)!r}")
        if lowrank is not None:
            if mask is not None:
                self.fail("mask", f"lowrank: {lowrank.method} allows no mask; got {mask}")
            if memory_tokens:
                self.fail("memory_tokens", f"lowrank: {lowrank.method} allows no memory "
                                           f"tokens; got memory_tokens: {memory_tokens}")
            if lowrank.method == "nystrom":
                for key, bad in (("score_mod", score_mod is not None),
                                 ("normalize", normalize != "softmax"),
                                 ("score", score != "dot")):
                    if bad:
                        self.fail(key, "nystrom takes score: dot, normalize: softmax and no "
                                       f"score_mod; got {key}: {self.data.get(key)!r}")


def _is_causal(mask) -> bool:
    return isinstance(mask, sympy.Rel) and mask.canonical == CAUSAL.canonical


def _implied_inputs(score, lowrank, memory_tokens, feature_map, features) -> dict:
    s = sym.SIZES
    implied = {}
    if lowrank is not None and lowrank.method == "linformer":
        implied["E"] = implied["F"] = (sympy.Integer(lowrank.size), s["seq_k"])
    if memory_tokens:
        implied["mem_k"] = (s["kv_heads"], sympy.Integer(memory_tokens), s["head_dim"])
        implied["mem_v"] = (s["kv_heads"], sympy.Integer(memory_tokens), s["value_dim"])
    if score == "additive":
        implied["w"] = (s["heads"], s["head_dim"])
    if feature_map == "performer" and features is not None:
        implied["omega"] = (sympy.Integer(features), s["head_dim"])
    return implied


def _suggest(value, options) -> str:
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _plain(value):
    """A JSON-able deep copy, for hashing and printing."""
    return json.loads(json.dumps(value, default=str))
