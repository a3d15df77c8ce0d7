"""The generated Triton modules are readable Python: ``ruff check`` (the project's rules, 100
columns) passes on the module of every kind of spec, without importing or running Triton."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "plugins"))

from attncc.ir.graph import attention_node  # noqa: E402
from attncc.passes.pipeline import lower  # noqa: E402
from attncc.spec import load_spec  # noqa: E402
from attncc.testing import examples_dir  # noqa: E402
from attncc_triton.source import generate  # noqa: E402

#: alibi (score_mod + mask, hoisted slope[h]), document mask (mask reading an input), top-k,
#: linear attention, Nyström, memory tokens, the additive score, Linformer, softcap (a score_mod
#: whose gradient reads the score), relative bias (an input at a computed index), sigmoid
SPECS = ["alibi", "document_mask", "topk", "linear_elu", "performer", "nystrom",
         "memory_tokens", "additive", "linformer", "softcap", "relative_bias", "sigmoid",
         "bigbird"]


#: bounded reductions: a contraction (tl.dot of two tiles) and a general body (a third axis),
#: with the gradients of the inputs they read
REDUCTIONS = {
    "rope_dot": {"attncc": 1, "head_dim": 16, "score_mod": "score + tanh(dot(qr[b, h, q_idx], "
                 "kr[b, h, kv_idx]))", "mask": "kv_idx <= q_idx",
                 "inputs": {"qr": {"shape": ["batch", "heads", "seq_q", 24]},
                            "kr": {"shape": ["batch", "heads", "seq_k", 24]}}},
    "distance_sum": {"attncc": 1, "score_mod": "score - sum(w[h, d] * exp(-abs(q_idx - kv_idx) "
                     "/ 2 ** d) for d in range(4))", "inputs": {"w": {"shape": ["heads", 4]}}},
    "abs_sum": {"attncc": 1, "score_mod": "score - abs(sum(w[h, d] * (q_idx - kv_idx) for d in "
                "range(4)))", "inputs": {"w": {"shape": ["heads", 4]}}},
}


def _source(name: str) -> str:
    spec = load_spec(REDUCTIONS.get(name) or next(examples_dir().glob(f"{name}.*")))
    node = attention_node(lower(spec))[1]
    config = ({"chunk": 16, "num_warps": 4, "num_stages": 1} if spec.normalize == "linear"
              else {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1})
    return generate(spec, node, config)


def test_ruff_passes_on_the_generated_modules(tmp_path):
    files = []
    for name in [*SPECS, *REDUCTIONS]:
        path = tmp_path / f"{name}.py"
        path.write_text(_source(name), encoding="utf-8")
        files.append(str(path))
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config",
                           str(ROOT / "pyproject.toml"), *files],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_subtraction_and_negation_print_as_such():
    source = _source("alibi")
    assert "(q_idx - kv_idx)" in source and "(-1)" not in source


def test_a_contraction_prints_as_one_tl_dot():
    source = _source("rope_dot")
    assert "tl.dot(ra0, tl.trans(rb0)" in source and "tl.arange(0, 32)" in source
    assert "qr_grad" in source and "kr_grad" in source


def test_a_reduction_under_abs_is_printed_once():
    source = _source("abs_sum")
    assert "tl.abs(red0)" in source and "red1" not in source  # no dead second copy
