"""``attncc viz SPEC --inputs in.npz``: attention-map panels, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from spec_inputs import random_case

import attncc
from attncc.cli import cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def npz(tmp_path, name, **sizes):
    case = random_case(attncc.load_spec(EXAMPLES / f"{name}.yaml"), **sizes)
    path = tmp_path / f"{name}.npz"
    np.savez(path, q=case.q, k=case.k, v=case.v, **case.inputs)
    return path


@pytest.mark.parametrize(("name", "args"), [
    ("sliding_window", ["--heads", "0,1", "--rows", "0:48", "--log", "--block-m", "16"]),
    ("memory_tokens", ["--rows", "40,3,7"]), ("linear_elu", [])])
def test_viz_draws_maps(tmp_path, name, args):
    png = tmp_path / "maps.png"
    result = CliRunner().invoke(cli, ["viz", str(EXAMPLES / f"{name}.yaml"), "--inputs",
                                       str(npz(tmp_path, name, seq_q=64)), *args, "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.output.startswith(f"wrote {png} (maps of heads ")


@pytest.mark.parametrize(("args", "message"), [
    (["--heads", "5"], "heads: expected query head numbers in [0, 2); got [5]"),
    (["--rows", "x"], "--rows: expected A:B or I,J,... (integers), got 'x'")])
def test_viz_map_errors_are_one_line(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["viz", str(EXAMPLES / "causal.yaml"), "--inputs",
                                       str(npz(tmp_path, "causal")), *args, "-o",
                                       str(tmp_path / "x.png")])
    assert result.exit_code != 0 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_viz_reads_its_inputs_as_run_does(tmp_path):
    # the .npz checks of ``attncc run``: a missing array or a file that is no .npz is one line
    np.savez(tmp_path / "qk.npz", q=np.zeros((1, 2, 8, 4)), k=np.zeros((1, 2, 8, 4)))
    (tmp_path / "bad.npz").write_text("not a zip")
    for path, message in ((tmp_path / "qk.npz", "missing array(s) v"),
                          (tmp_path / "bad.npz", "not an .npz file")):
        result = CliRunner().invoke(cli, ["viz", str(EXAMPLES / "causal.yaml"), "--inputs",
                                          str(path), "-o", str(tmp_path / "x.png")])
        assert result.exit_code != 0 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
