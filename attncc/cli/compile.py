"""``attncc compile SPEC -o DIR``: the generated kernel source and a manifest.json beside it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import click

from attncc.cli.options import detect_target, load, spec_argument, target_option

MANIFEST_FILE = "manifest.json"


@click.command("compile")
@spec_argument
@click.option("--backend", default="auto", show_default=True,
              help="Backend name, or auto for the best supported one.")
@target_option
@click.option("--config", "config_json", default=None, metavar="JSON",
              help='Tile parameters overriding the defaults, e.g. \'{"block_m": 32}\'.')
@click.option("-o", "--output", "out_dir", required=True,
              type=click.Path(file_okay=False, writable=True),
              help="Directory to write the kernel source and manifest.json into (created).")
def compile_command(spec: str, backend: str, target_name: str, config_json: str | None,
                    out_dir: str) -> None:
    """Compile SPEC with a backend; write its source and a manifest to DIR."""
    import attncc
    from attncc.api import compile as compile_spec
    from attncc.backends import registry

    loaded = load(spec)
    target = detect_target(target_name)
    kernel = compile_spec(loaded, backend=backend, target=target, config=parse_config(config_json))
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    source_file = source_name(kernel.source)
    (directory / source_file).write_text(kernel.source, encoding="utf-8")
    for name, text in kernel.companions().items():
        (directory / name).write_text(text, encoding="utf-8")
    manifest = {
        "spec": loaded.name,
        "spec_hash": loaded.hash,
        "spec_file": str(Path(spec).resolve()),
        "backend": kernel.backend,
        "backend_version": registry.get(kernel.backend).version,
        "selection": kernel.selection,
        "config": kernel.config,
        "target": target.key(),
        "target_detail": target.to_dict(),
        "attncc_version": attncc.__version__,
        "source": source_file,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n",
                                           encoding="utf-8")
    click.echo(f"{loaded.name}: compiled with {kernel.backend} "
               f"(config {json.dumps(kernel.config, default=str)})")
    click.echo(f"wrote {directory / source_file} and {directory / MANIFEST_FILE}")


def source_name(source: str) -> str:
    """``kernel.py`` when the generated source is Python, else ``kernel.txt`` (a readable
    description of the lowering, as some backends give)."""
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return "kernel.txt"
    return "kernel.py"


def parse_config(text: str | None) -> dict | None:
    """The --config JSON object, or None; InputError when it is not a JSON object."""
    from attncc.errors import InputError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"--config: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise InputError(f"--config: expected a JSON object of tile parameters, got {text!r}")
    return value
