"""The attncc command line: each command's happy path, and user mistakes as one line, no traceback.

Specs are written to tmp_path so these tests do not depend on examples/; sizes are small.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import attncc
from attncc.backends import registry
from attncc.errors import BackendError
from attncc.spec.load import load_spec
from attncc.target import Target, default_target

CAUSAL = "attncc: 1\nname: causal\nmask: kv_idx <= q_idx\n"
ALIBI = ("attncc: 1\nname: alibi\nscore_mod: score - slope[h] * (q_idx - kv_idx)\n"
         "mask: kv_idx <= q_idx\ninputs:\n  slope: {shape: [heads], dtype: float32}\n")
DOCUMENT = ("attncc: 1\nname: document\nmask: doc[b, q_idx] == doc[b, kv_idx]\n"
            "inputs:\n  doc: {shape: [batch, seq_q], dtype: int32}\n")
GQA = "attncc: 1\nname: gqa\nheads: 8\nkv_heads: 2\nmask: kv_idx <= q_idx\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def specs(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name, text in (("causal", CAUSAL), ("alibi", ALIBI), ("document", DOCUMENT),
                       ("gqa", GQA)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        paths[name] = str(path)
    return paths


def invoke(*args: str):
    from attncc.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def assert_one_line_error(result, fragment: str) -> str:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]
    return lines[0]


# -- happy paths ---------------------------------------------------------------------------------

def test_show_prints_ir_plan_cost_and_inputs(specs):
    out = assert_ok(invoke("show", specs["causal"], "--seq", 256, "--block-m", 64,
                           "--block-n", 64))
    assert "passes: shapes, masks, fuse, cost" in out and "FusedAttention(" in out
    # causal at 256 in 64x64 blocks: 4 diagonal PARTIAL, 6 FULL, 6 EMPTY blocks
    assert "FULL             6" in out and "PARTIAL          4" in out
    assert "block density: 0.6250" in out
    # flops = batch*heads*seq_q*seq_k*density*(2*head_dim + 2*value_dim) with defaults 1, 4, 32
    assert "flops = batch*density*heads*seq_k*seq_q*(2*head_dim + 2*value_dim)" in out
    assert f"= {1 * 4 * 256 * 256 * 0.625 * 128:.4e}" in out
    assert "q  [batch, heads, seq_q, head_dim] = (1, 4, 256, 32)" in out


def test_show_classifies_an_input_reading_mask_and_lists_inputs(specs):
    out = assert_ok(invoke("show", specs["document"], "--seq", 128, "--batch", 2))
    assert "the mask reads inputs" in out
    assert "doc  [batch, seq_q] = (2, 128)  int32" in out
    alibi = assert_ok(invoke("show", specs["alibi"], "--seq", 64, "--heads", 2))
    assert "slope  [heads] = (2,)  float32" in alibi
    # the strategy pass's lowering, one path a line (columns as wide as the longest name)
    assert re.search(r"^sdpa +no +score_mod reads slope\[h\]$", alibi, re.M)
    assert re.search(r"^tiles +yes +", alibi, re.M)
    assert "the mask reads inputs" not in alibi


def test_check_passes_a_backend_that_agrees(specs):
    out = assert_ok(invoke("check", specs["alibi"], "--seq", 32, "--batch", 1, "--backend",
                           "numpy"))
    assert "numpy    PASS    out" in out and "FAIL" not in out
    assert "\n                 lse" in out
    assert "batch=1 heads=4 kv_heads=2 seq_q=32 seq_k=32" in out


@pytest.mark.parametrize("command", ["check", "show"])
def test_head_dim_help_names_the_default_the_command_runs(specs, command):
    help_text = " ".join(assert_ok(invoke(command, "--help")).split())
    shown = int(help_text.split("leaves it open (default ")[1].split(")")[0])
    args = ("--backend", "numpy") if command == "check" else ()
    out = assert_ok(invoke(command, specs["causal"], "--seq", 32, *args))
    assert f"head_dim={shown}" in out.replace(" = ", "=").replace(": ", "=")


class _Skewed:
    """Wraps the numpy backend; its kernel adds 1e-3 to the output, so it must FAIL."""

    name = "skewed"
    version = "0"
    library = "numpy"

    def __init__(self, inner, supported=True):
        self.inner = inner
        self.supported = supported

    def supports(self, graph, target):
        from attncc.backends.base import Support

        return Support(True) if self.supported else Support(False, "skewed on purpose")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def compile(self, graph, config, target):
        kernel = self.inner.compile(graph, config, target)

        class Off:
            backend = "skewed"
            backward = None
            source = kernel.source
            config = kernel.config

            def __call__(self, q, k, v, *, return_lse=False, **inputs):
                out = kernel(q, k, v, return_lse=return_lse, **inputs)
                return (out[0] + 1e-3, out[1]) if return_lse else out + 1e-3

        return Off()


@pytest.fixture
def fake_backends(monkeypatch):
    numpy_backend = registry.get("numpy")
    table = {"numpy": numpy_backend, "skewed": _Skewed(numpy_backend),
             "refuses": _Skewed(numpy_backend, supported=False),
             "broken": BackendError("backend 'broken' (x:Y) cannot be loaded: ImportError")}

    def get(name):
        found = table.get(name)
        if found is None:
            raise BackendError(f"unknown backend '{name}'")
        if isinstance(found, BackendError):
            raise found
        return found

    monkeypatch.setattr(registry, "names", lambda: sorted(table))
    monkeypatch.setattr(registry, "get", get)


def test_check_fails_on_disagreement_and_lists_skips(specs, fake_backends):
    result = invoke("check", specs["causal"], "--seq", 32, "--batch", 1)
    assert result.exit_code == 1
    out = result.stdout
    assert "numpy    PASS" in out
    assert "skewed   FAIL" in out
    assert "refuses  SKIP    skewed on purpose" in out
    assert "broken   SKIP    backend 'broken' (x:Y) cannot be loaded" in out
    only_numpy = invoke("check", specs["causal"], "--seq", 32, "--backend", "numpy")
    assert_ok(only_numpy)
    assert "skewed" not in only_numpy.stdout


def test_compile_writes_source_and_manifest(specs, tmp_path):
    out_dir = tmp_path / "build"
    out = assert_ok(invoke("compile", specs["causal"], "--backend", "numpy", "-o", out_dir))
    manifest = json.loads((out_dir / "manifest.json").read_text())
    source = (out_dir / manifest["source"]).read_text()
    assert source and manifest["source"] in ("kernel.py", "kernel.txt")
    assert manifest["spec_hash"] == load_spec(specs["causal"]).hash
    assert manifest["backend"] == "numpy"
    assert manifest["backend_version"] == registry.get("numpy").version
    assert manifest["target"] == default_target().key()
    assert Target.from_dict(manifest["target_detail"]) == default_target()
    assert manifest["attncc_version"] == attncc.__version__
    assert manifest["config"] and "numpy" in out


def test_compile_passes_a_config(specs, tmp_path):
    out_dir = tmp_path / "tuned"
    assert_ok(invoke("compile", specs["causal"], "--backend", "numpy", "--config",
                     '{"block_m": 16, "block_n": 16}', "-o", out_dir))
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["config"]["block_m"] == 16 and manifest["config"]["block_n"] == 16


def _save_inputs(path: Path, heads=2, seq=48, dim=8, **extra):
    rng = np.random.default_rng(1)
    arrays = {name: rng.standard_normal((1, heads, seq, dim)).astype(np.float32)
              for name in ("q", "k", "v")}
    np.savez(path, **arrays, **extra)
    return arrays


def test_run_writes_output_and_lse_and_prints_times(specs, tmp_path):
    slope = np.array([0.5, 0.25], dtype=np.float32)
    arrays = _save_inputs(tmp_path / "in.npz", slope=slope)
    out_path = tmp_path / "out"  # no suffix: written exactly here, not to out.npz
    out = assert_ok(invoke("run", specs["alibi"], "--inputs", tmp_path / "in.npz", "-o",
                           out_path, "--backend", "numpy", "--lse", "--repeat", 2))
    assert "first call" in out and "median of 2" in out
    with np.load(out_path) as saved:
        assert sorted(saved.files) == ["lse", "out"]
        ref, lse = attncc.reference(specs["alibi"], arrays["q"], arrays["k"], arrays["v"],
                                    return_lse=True, slope=slope)
        np.testing.assert_allclose(saved["out"], ref, atol=1e-4)
        np.testing.assert_allclose(saved["lse"], lse, atol=1e-4)
        assert saved["out"].dtype == np.float32


def test_run_casts_with_dtype_and_skips_lse_without_flag(specs, tmp_path):
    _save_inputs(tmp_path / "in.npz")
    out = assert_ok(invoke("run", specs["causal"], "--inputs", tmp_path / "in.npz", "-o",
                           tmp_path / "o.npz", "--backend", "numpy", "--dtype", "float64",
                           "--repeat", 0))
    assert "median" not in out
    with np.load(tmp_path / "o.npz") as saved:
        assert saved.files == ["out"] and saved["out"].dtype == np.float64


def test_viz_writes_a_png(specs, tmp_path):
    for name in ("causal", "document"):
        png = tmp_path / f"{name}.png"
        out = assert_ok(invoke("viz", specs[name], "-o", png, "--seq", 256, "--mask-size", 32))
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        assert "block density" in out


def test_viz_element_mask_is_the_mask():
    from attncc.cli.viz import element_mask

    mask = element_mask(load_spec(CAUSAL), {"batch": 1, "heads": 1, "kv_heads": 1, "seq_q": 8,
                                            "seq_k": 8, "head_dim": 4, "value_dim": 4}, None)
    assert (mask == np.tril(np.ones((8, 8), dtype=bool))).all()


def test_backends_and_target(tmp_path):
    out = assert_ok(invoke("backends"))
    assert re.search(r"^numpy +ok +version", out, re.MULTILINE)
    for name in registry.names():
        assert out.count(f"{name} ") >= 1
    text = assert_ok(invoke("target"))
    assert default_target().key() in text and "ISA flags:" in text
    data = json.loads(assert_ok(invoke("target", "--json")))
    assert data["key"] == default_target().key()
    assert assert_ok(invoke("target", "--layers", 1)).strip() == default_target().key(1)


# -- user mistakes -------------------------------------------------------------------------------

def test_missing_and_bad_spec_files(specs, tmp_path):
    assert_one_line_error(invoke("show", tmp_path / "nope.yaml"), "no such file")
    assert_one_line_error(invoke("viz", tmp_path, "-o", tmp_path / "x.png"), "not a file")
    bad = tmp_path / "bad.yaml"
    bad.write_text("attncc: 1\nmaks: kv_idx <= q_idx\n")
    assert_one_line_error(invoke("check", bad), "did you mean 'mask'")
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("attncc: 1\nmask: kv_idx <=\n")
    assert_one_line_error(invoke("show", syntax), "mask")
    assert_one_line_error(invoke("show", specs["gqa"], "--heads", 4), "spec fixes heads = 8")


def test_unknown_backend_and_bad_options(specs, tmp_path):
    assert_one_line_error(invoke("compile", specs["causal"], "--backend", "nosuch", "-o",
                                 tmp_path / "d"), "unknown backend 'nosuch'")
    assert_one_line_error(invoke("check", specs["causal"], "--backend", "nosuch"),
                          "unknown backend 'nosuch'")
    assert_one_line_error(invoke("compile", specs["causal"], "--backend", "numpy", "--config",
                                 "{bad", "-o", tmp_path / "d"), "--config: not valid JSON")
    assert_one_line_error(invoke("show", specs["causal"], "--seq", 0), "--seq")
    assert_one_line_error(invoke("nosuchcommand"), "No such command")
    assert_one_line_error(invoke("target", "--target", "tpu"), "expected 'cpu', 'cuda'")


def test_bad_npz_inputs(specs, tmp_path):
    def run(path):
        return invoke("run", specs["causal"], "--inputs", path, "-o", tmp_path / "o.npz",
                      "--backend", "numpy")

    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    assert_one_line_error(run(text), "not an .npz file")
    assert_one_line_error(run(tmp_path / "missing.npz"), "no such file")
    np.savez(tmp_path / "qk.npz", q=np.zeros((1, 1, 4, 4)), k=np.zeros((1, 1, 4, 4)))
    assert_one_line_error(run(tmp_path / "qk.npz"), "missing array(s) v")
    _save_inputs(tmp_path / "extra.npz", foo=np.zeros(3))
    assert_one_line_error(run(tmp_path / "extra.npz"), "array 'foo' is not an input")
    np.savez(tmp_path / "objects.npz", q=np.array([{}], dtype=object))
    assert_one_line_error(run(tmp_path / "objects.npz"), "not a readable .npz")
    np.savez(tmp_path / "shape.npz", q=np.zeros((1, 1, 4, 4)), k=np.zeros((1, 1, 5, 4)),
             v=np.zeros((1, 1, 4, 4)))
    assert_one_line_error(run(tmp_path / "shape.npz"), "expected shape")
    _save_inputs(tmp_path / "in.npz")
    assert_one_line_error(invoke("run", specs["causal"], "--inputs", tmp_path / "in.npz", "-o",
                                 tmp_path / "no" / "dir" / "o.npz"), "does not exist")


def test_the_installed_script_prints_one_line(specs):
    script = shutil.which("attncc") or str(Path(sys.executable).parent / "attncc")
    if not Path(script).exists():
        pytest.skip("the attncc console script is not installed")
    bad = subprocess.run([script, "show", specs["causal"] + ".missing"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: {specs['causal']}.missing: no such file"]
    assert "Traceback" not in bad.stdout + bad.stderr
    good = subprocess.run([script, "target", "--layers", "2"], capture_output=True, text=True,
                          timeout=60)
    assert good.returncode == 0 and good.stdout.strip() == default_target().key(2)


def test_show_and_viz_every_example(tmp_path):
    from attncc.testing import example_specs

    paths = example_specs()
    if not paths:
        pytest.skip("examples/ holds no spec files")
    for path in paths:
        out = assert_ok(invoke("show", path, "--seq", 128))
        assert "block density:" in out and "flops =" in out
        png = tmp_path / f"{Path(path).stem}.png"
        assert_ok(invoke("viz", path, "--seq", 128, "--mask-size", 16, "-o", png))
        assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_bench_times_backends_next_to_sdpa_and_skips_with_reasons():
    out = assert_ok(invoke("bench", "examples/causal.yaml", "--seq", 32, "--repeat", 1,
                           "--backend", "numpy", "--backend", "torch"))
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert set(rows) >= {"numpy", "torch", "sdpa"}
    assert "1.00x" in rows["sdpa"] and "causal" in rows["sdpa"]
    assert float(rows["numpy"].split()[1]) > 0
    assert_one_line_error(invoke("bench", "examples/causal.yaml", "--backend", "nope"),
                          "unknown backend 'nope'")
