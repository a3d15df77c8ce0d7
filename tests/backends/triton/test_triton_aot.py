"""The generated Triton kernels compile ahead of time for an H200 (sm_90) without a GPU.

``bench/triton_aot_sm90.py`` runs ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` down to a
cubin with the ptxas of the triton wheel. It runs in a subprocess: tests/conftest.py turns on
TRITON_INTERPRET=1 on machines without a GPU, and under the interpreter ``@triton.jit`` (Triton's
own library helpers included) yields interpreted functions the compiler cannot take.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "plugins"))

from attncc.passes.pipeline import lower  # noqa: E402
from attncc.spec import load_spec  # noqa: E402
from attncc.target import Target  # noqa: E402
from attncc.testing import examples_dir  # noqa: E402
from attncc_triton import TritonBackend  # noqa: E402

SMEM_LIMIT = 227 * 1024
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
H200 = Target(kind="cuda", device="NVIDIA H200 (AOT)", arch="cuda", compute_capability=(9, 0),
              shared_memory_per_block=SMEM_LIMIT, sm_count=132, registers_per_block=65536)
#: at head_dim 256 (bf16) the dq kernel of this config needs more shared memory than an H200 block
#: may have (q, do, k, v tiles: 2 x 256 x 512 x 2 B = 256 KiB > 227 KiB)...
TOO_BIG = {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 1}
#: ...and the dk/dv kernel (the largest) of this one fits, close to the limit (208 KiB)
FITS = {"block_m": 64, "block_n": 128, "num_warps": 8, "num_stages": 1}
#: spill bytes the dk/dv kernel is allowed at the default config: it transposes the probability
#: and score-gradient tiles in registers (measured on sm_90: 650-1050 B at d 128)
DKDV_SPILL = 1536


def _missing() -> str:
    try:
        from triton.backends import backends
    except ImportError as err:
        return f"this triton has no backends registry ({err})"
    if "nvidia" not in backends:
        return "triton's nvidia backend is not installed"
    if not any((BIN / name).exists() for name in ("ptxas", "ptxas-blackwell")):
        return f"no ptxas in {BIN} (the triton wheel ships one; this install does not)"
    return ""


pytestmark = pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok")


def _aot(tmp_path, specs: str, kernels: str, config: dict | None = None,
         head_dim: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    out = tmp_path / "aot.json"
    cmd = [sys.executable, str(ROOT / "bench" / "triton_aot_sm90.py"), "--specs", specs,
           "--dtypes", "bfloat16", "--sweep", "none", "--kernels", kernels, "--json", str(out),
           "--no-md", "--quiet", "--timeout", "240"]
    if config:
        cmd += ["--config", json.dumps(config)]
    if head_dim:
        cmd += ["--head-dim", str(head_dim)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def _keep(name: str, config: dict, head_dim: int, dtype: str = "bfloat16") -> bool:
    spec = replace(load_spec(examples_dir() / f"{name}.yaml"), head_dim=head_dim,
                   value_dim=head_dim)
    graph = lower(spec)
    graph.graph["dtype"] = dtype  # what the AOT runs above compile
    return TritonBackend().search_space(graph, H200).keep(config)


def test_default_configs_compile_for_sm90_within_limits_and_without_spills(tmp_path):
    data = _aot(tmp_path, "causal,document_mask,alibi", "fwd,bwd_dq,bwd_dkdv")
    kernels = data["kernels"]
    assert {(k["spec"], k["kernel"]) for k in kernels} == {
        (s, n) for s in ("causal", "document_mask", "alibi")
        for n in ("fwd", "bwd_dq", "bwd_dkdv")}
    for k in kernels:
        where = f"{k['spec']} {k['kernel']} {k['config']}"
        assert k["ok"], f"{where}: {k['error']}"
        assert 0 < k["shared"] <= SMEM_LIMIT, f"{where}: shared memory {k['shared']} B"
        assert k["registers"] <= 255, f"{where}: {k['registers']} registers"
        allowed = DKDV_SPILL if k["kernel"] == "bwd_dkdv" else 0
        assert k["spill_stores"] <= allowed, f"{where}: spills {k['spill_stores']} B"
    # the default is what keep() admits, and it does fit
    for c in data["configs"]:
        assert c["keep"] and c["fits"], c


def test_keep_rejects_a_config_the_compiler_says_does_not_fit(tmp_path):
    data = _aot(tmp_path, "causal", "bwd_dq", TOO_BIG, head_dim=256)
    (dq,) = data["kernels"]
    assert dq["ok"], dq["error"]
    assert dq["shared"] > SMEM_LIMIT, f"expected the dq kernel not to fit, got {dq['shared']} B"
    assert not _keep("causal", TOO_BIG, 256)
    assert data["configs"][0]["keep"] is False and data["configs"][0]["fits"] is False


def test_keep_admits_a_config_near_the_limit_that_fits(tmp_path):
    data = _aot(tmp_path, "causal", "bwd_dkdv", FITS, head_dim=256)
    (dkdv,) = data["kernels"]
    assert dkdv["ok"], dkdv["error"]
    assert 200 * 1024 < dkdv["shared"] <= SMEM_LIMIT, dkdv["shared"]
    assert _keep("causal", FITS, 256)
