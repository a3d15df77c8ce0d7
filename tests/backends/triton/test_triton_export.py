"""Ahead-of-time export: the generated module and its host runtime run in a fresh process with
only torch and triton (no block tables given: every masked block PARTIAL), and ``attncc compile
--backend triton`` writes both with a manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Triton decorates its own helpers at import: the interpreter must be on before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "plugins"))

from attncc.backends import registry
from attncc.passes.pipeline import lower
from attncc.spec import load_spec
from attncc.target import Target
from attncc.testing import examples_dir
from attncc_triton import TritonBackend

RUNNER = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    import torch
    spec = importlib.util.spec_from_file_location("exported", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not any(name.startswith("attncc") for name in sys.modules), "imports attncc"
    data = np.load(sys.argv[2])
    q, k, v = (torch.from_numpy(data[n]).requires_grad_() for n in ("q", "k", "v"))
    ins = {n[3:]: torch.from_numpy(data[n]) for n in data.files if n.startswith("in_")}
    out, lse = mod.attention(q, k, v, return_lse=True, **ins)
    out.sum().backward()
    np.savez(sys.argv[3], out=out.detach().numpy(), lse=lse.detach().numpy(), dq=q.grad.numpy())
""")


def test_exported_module_runs_without_attncc(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    import numpy as np
    import torch

    from attncc.reference import attend
    from attncc.testing import random_inputs

    spec = load_spec(examples_dir() / "document_mask.yaml")
    graph = lower(spec)
    target = Target.detect("cpu")
    kernel = TritonBackend().compile(graph, TritonBackend().default_config(graph, target),
                                     target)
    (tmp_path / "kernel.py").write_text(kernel.source)
    for name, text in kernel.companions().items():  # the host runtime it imports
        (tmp_path / name).write_text(text)
    (tmp_path / "run.py").write_text(RUNNER)
    q, k, v, inputs = random_inputs(spec, 2, 21, 21, "float64", 1, "torch")
    np.savez(tmp_path / "in.npz", q=q.numpy(), k=k.numpy(), v=v.numpy(),
             **{f"in_{n}": x.numpy() for n, x in inputs.items()})
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-B", str(tmp_path / "run.py"),
                    str(tmp_path / "kernel.py"), str(tmp_path / "in.npz"),
                    str(tmp_path / "out.npz")], check=True, env=env, cwd=tmp_path,
                   timeout=300)
    got = np.load(tmp_path / "out.npz")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attend(spec, *leaves, inputs, return_lse=True)
    out.sum().backward()
    np.testing.assert_allclose(got["out"], out.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(got["lse"], lse.detach().numpy(), atol=1e-10)
    np.testing.assert_allclose(got["dq"], leaves[0].grad.numpy(), atol=1e-10)
    assert torch.isfinite(torch.from_numpy(got["out"])).all()


@pytest.mark.skipif("triton" not in registry.names(),
                    reason="the triton entry point is not registered (pip install -e .)")
def test_cli_compile_writes_the_module_and_a_manifest(tmp_path):
    from click.testing import CliRunner

    from attncc.cli import cli

    spec_file = examples_dir() / "sliding_window.yaml"
    result = CliRunner().invoke(cli, ["compile", str(spec_file), "--backend", "triton",
                                       "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    source = (tmp_path / "kernel.py").read_text()
    assert "def attention(q, k, v" in source and "@triton.jit" in source
    runtime = [p.name for p in tmp_path.glob("attention_runtime_*.py")]
    assert len(runtime) == 1 and f"from {runtime[0][:-3]} import Program" in source
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["backend"] == "triton"
    assert manifest["spec_hash"] == load_spec(spec_file).hash
    assert manifest["config"]["block_m"] >= 16 and manifest["target"]
