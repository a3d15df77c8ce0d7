"""Compile a spec with the Triton backend, export the kernel module, import it without attncc.

    python examples/scripts/export_standalone.py [--spec examples/causal.yaml] [-o DIR]

The Triton backend generates one standalone Python module per (spec, config): kernels, host code
and the entry point ``attention(q, k, v, *, return_lse=False, tables=None, **inputs)``, needing
only torch and triton. This script writes it to DIR/kernel.py, then runs a fresh interpreter in
which importing attncc is made impossible, imports the module from the file and checks it against
torch's SDPA. Without a GPU it runs under ``TRITON_INTERPRET=1`` (slow; the sizes are tiny).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent

STANDALONE = r"""
import importlib.abc, importlib.util, sys

class NoAttncc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "attncc" or name.startswith(("attncc.", "attncc_")):
            raise ImportError(f"{name} is blocked: the exported module must not need attncc")
        return None

sys.meta_path.insert(0, NoAttncc())
import torch
spec = importlib.util.spec_from_file_location("exported_kernel", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
device = "cuda" if torch.cuda.is_available() else "cpu"
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 48, 16, generator=gen).to(device) for _ in range(3))
out = module.attention(q, k, v)
want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
assert not any(m == "attncc" or m.startswith("attncc.") for m in sys.modules)
print(f"{(out - want).abs().max().item():.3g}")
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(EXAMPLES / "causal.yaml"),
                        help="a causal spec (the check compares with SDPA's is_causal=True)")
    parser.add_argument("-o", "--output", default=None, help="directory for kernel.py")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: this example needs torch and triton", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

    import attncc.api
    from attncc.errors import AttnccError

    try:
        kernel = attncc.api.compile(args.spec, backend="triton")
    except AttnccError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out_dir = Path(args.output or tempfile.mkdtemp(prefix="attncc_export_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernel.py"
    path.write_text(kernel.source, encoding="utf-8")
    print(f"wrote {path} ({len(kernel.source.splitlines())} lines, config {kernel.config})")
    result = subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(path)],  # noqa: S603
                            capture_output=True, text=True, check=False, env=dict(os.environ),
                            cwd=out_dir)
    if result.returncode:
        print(f"standalone import failed:\n{result.stderr.strip()}", file=sys.stderr)
        return 1
    error = float(result.stdout.strip().splitlines()[-1])
    print(f"imported {path.name} in a fresh interpreter with attncc blocked; "
          f"max |out - sdpa| = {error:.3g}")
    return 0 if error < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
