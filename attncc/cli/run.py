"""``attncc run SPEC --inputs in.npz -o out.npz``: one kernel call on saved inputs, timed."""

from __future__ import annotations

import statistics
import time
import zipfile
from pathlib import Path

import click
import numpy as np

from attncc.cli.options import DTYPES, detect_target, load, spec_argument, target_option
from attncc.errors import InputError


@click.command("run")
@spec_argument
@click.option("--inputs", "inputs_path", required=True, type=click.Path(dir_okay=False),
              help="An .npz holding q, k, v and the spec's named inputs.")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The .npz to write: 'out' (and 'lse' with --lse).")
@click.option("--backend", default="auto", show_default=True,
              help="Backend name, or auto for the best supported one.")
@target_option
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Cast q, k, v to this dtype first (default: as stored).")
@click.option("--lse", is_flag=True, help="Also write the log-sum-exp as 'lse'.")
@click.option("--repeat", type=click.IntRange(min=0), default=5, show_default=True,
              help="Timed calls after the first; their median is printed.")
def run(spec: str, inputs_path: str, out_path: str, backend: str, target_name: str,
        dtype: str | None, lse: bool, repeat: int) -> None:
    """Run SPEC on the arrays in an .npz and save the output; print the call times."""
    from attncc.api import compile as compile_spec
    from attncc.plan import host_array

    loaded = load(spec)
    arrays = read_npz(inputs_path, loaded)
    writable_parent(out_path)
    target = detect_target(target_name)
    kernel = compile_spec(loaded, backend=backend, target=target)
    q, k, v = (_cast(arrays.pop(name), dtype) for name in ("q", "k", "v"))
    args = to_library(kernel, target, (q, k, v), arrays)
    sync = target.sync or (lambda: None)

    def timed_call():
        start = time.perf_counter()
        result = kernel(*args[0], return_lse=lse, **args[1])
        sync()
        return result, time.perf_counter() - start

    result, first = timed_call()
    times = [timed_call()[1] for _ in range(repeat)]
    out, lse_value = result if lse else (result, None)
    saved = {"out": host_array(out, keep_float16=True)}
    if lse:
        saved["lse"] = host_array(lse_value, keep_float16=True)
    with open(out_path, "wb") as file:  # a file object: savez would append .npz to a name
        np.savez(file, **saved)
    click.echo(f"{loaded.name} on {kernel.backend}: out {tuple(saved['out'].shape)} "
               f"{saved['out'].dtype} -> {out_path}")
    timing = f"first call {_ms(first)}"
    if times:
        timing += f"; median of {len(times)} {_ms(statistics.median(times))}"
    click.echo(timing)


def read_npz(path: str, spec) -> dict[str, np.ndarray]:
    """q, k, v and the named inputs from ``path``; InputError on anything else in it."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not an .npz file (expected the zip archive that numpy.savez "
                         "writes)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as err:
        raise InputError(f"{path}: not a readable .npz of arrays ({err})") from None
    expected = ", ".join(["q", "k", "v", *spec.inputs])
    missing = [name for name in ("q", "k", "v") if name not in arrays]
    if missing:
        raise InputError(f"{path}: missing array(s) {', '.join(missing)}; expected {expected}; "
                         f"found {', '.join(arrays) or 'none'}")
    unknown = sorted(set(arrays) - {"q", "k", "v"} - set(spec.inputs))
    if unknown:
        raise InputError(f"{path}: array '{unknown[0]}' is not an input of spec "
                         f"'{spec.name}'; its inputs are {expected}")
    return arrays


def writable_parent(path: str) -> None:
    """InputError, before any work is done, when ``path``'s directory does not exist."""
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InputError(f"{path}: the directory {parent} does not exist")


def to_library(kernel, target, qkv: tuple, inputs: dict):
    """The call's arrays in the library the kernel's backend takes.

    That is ``Backend.library`` (``numpy`` or ``torch``), as in attncc.testing; torch tensors
    go to the target's device.
    """
    from attncc.backends import registry
    from attncc.testing.inputs import converter

    library = registry.get(kernel.backend).library
    if library == "numpy":
        return qkv, inputs
    to_torch = converter(library, None, target.torch_device)

    def convert(x):
        if x.dtype.kind not in "biuf":
            raise InputError(f"expected numeric arrays in the .npz, got dtype {x.dtype}")
        return to_torch(x)

    return tuple(convert(x) for x in qkv), {n: convert(x) for n, x in inputs.items()}


def _cast(x: np.ndarray, dtype: str | None) -> np.ndarray:
    if dtype is None:
        return x
    if dtype == "bfloat16":
        raise InputError("--dtype bfloat16: NumPy arrays cannot hold bfloat16; store the .npz "
                         "in float32 and pick a backend that computes in bfloat16")
    return x.astype(dtype)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"
