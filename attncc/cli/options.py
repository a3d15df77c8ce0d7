"""Options the commands share (DESIGN §7) and the helpers that turn them into sizes and targets.

Sizes a spec leaves open (heads, kv_heads, head_dim, value_dim) come from ``--heads`` and
``--head-dim``; a value the spec fixes cannot be overridden (the option must agree or be absent).
"""

from __future__ import annotations

import click

from attncc.errors import InputError

DTYPES = ("float16", "bfloat16", "float32", "float64")
DEFAULT_HEADS = 4
DEFAULT_HEAD_DIM = 32


def stacked(*decorators):
    """One decorator applying ``decorators`` as if written in this order above a command."""

    def decorate(command):
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return decorate


#: The positional SPEC: a path to a .yaml/.yml/.toml/.json spec file.
spec_argument = click.argument("spec", metavar="SPEC", type=str)
#: --target cpu|cuda|cuda:N (default cpu).
target_option = click.option("--target", "target_name", default="cpu", show_default=True,
                             metavar="cpu|cuda[:N]", help="Hardware target to compile for.")
dtype_option = click.option("--dtype", type=click.Choice(DTYPES), default="float32",
                            show_default=True, help="Floating dtype of q, k, v.")
#: --block-m and --block-n: the tile of the block plan.
block_options = stacked(
    click.option("--block-m", type=click.IntRange(min=1), default=64, show_default=True,
                 help="Query block size of the plan."),
    click.option("--block-n", type=click.IntRange(min=1), default=64, show_default=True,
                 help="Key block size of the plan."))


def size_options(seq: int, batch: int = 1, *, heads: bool = True,
                 head_dim: int = DEFAULT_HEAD_DIM):
    """--batch, --seq, --seq-k, --heads, --head-dim with command-specific defaults (without
    --heads where ``heads`` is False: the command defines its own; ``head_dim`` is the default
    the command uses, for the help)."""
    return stacked(
        click.option("--batch", type=click.IntRange(min=1), default=batch, show_default=True,
                     help="Batch size."),
        click.option("--seq", type=click.IntRange(min=1), default=seq, show_default=True,
                     help="Query length (seq_q)."),
        click.option("--seq-k", type=click.IntRange(min=1), default=None,
                     help="Key length (seq_k); default: --seq."),
        *([click.option("--heads", type=click.IntRange(min=1), default=None,
                        help=f"Query heads where the spec leaves them open "
                             f"(default {DEFAULT_HEADS}).")] if heads else []),
        click.option("--head-dim", type=click.IntRange(min=1), default=None,
                     help=f"Head dimension where the spec leaves it open "
                          f"(default {head_dim})."))


def every_backend_options(verb: str, seq: int, batch: int):
    """What ``check`` and ``bench`` share: SPEC, the sizes, --dtype, a repeatable --backend,
    --target and --seed (``verb`` words the --backend help). Their open sizes are
    ``attncc.testing``'s."""
    from attncc.testing import inputs

    return stacked(
        spec_argument, size_options(seq=seq, batch=batch, head_dim=inputs.DEFAULT_HEAD_DIM),
        dtype_option,
        click.option("--backend", "backend_names", multiple=True, metavar="NAME",
                     help=f"{verb} only this backend (repeatable); default: every installed "
                          "one."),
        target_option,
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the inputs."))


def resolve_sizes(spec, batch: int, seq: int, seq_k: int | None, heads: int | None,
                  head_dim: int | None) -> dict[str, int]:
    """Every size name -> int, from the spec where it fixes a size, else from the options."""
    heads = _agree(spec.heads, heads, "heads", "--heads", DEFAULT_HEADS)
    head_dim = _agree(spec.head_dim, head_dim, "head_dim", "--head-dim", DEFAULT_HEAD_DIM)
    kv_heads = spec.kv_heads or heads
    if heads % kv_heads:
        raise InputError(f"--heads {heads}: must be a multiple of the spec's kv_heads "
                         f"({kv_heads})")
    return {"batch": batch, "heads": heads, "kv_heads": kv_heads, "seq_q": seq,
            "seq_k": seq_k or seq, "head_dim": head_dim, "value_dim": spec.value_dim or head_dim}


def _agree(fixed: int | None, given: int | None, name: str, option: str, default: int) -> int:
    if fixed is not None and given is not None and given != fixed:
        raise InputError(f"{option} {given}: the spec fixes {name} = {fixed}")
    return fixed or given or default


def load(spec_path: str):
    """The validated Spec in the file ``spec_path`` (SpecError names the file on any problem)."""
    from pathlib import Path

    from attncc.errors import SpecError
    from attncc.spec.load import load_spec

    path = Path(spec_path)
    if not path.is_file():
        raise SpecError("not a file" if path.exists() else "no such file", file=spec_path)
    return load_spec(path)


def detect_target(name: str):
    """The Target for ``--target``; BackendError if that device is not there."""
    from attncc.target import Target, default_target

    return default_target() if name == "cpu" else Target.detect(name)


def lowered(spec_path: str, batch: int, seq: int, seq_k: int | None, heads: int | None,
            head_dim: int | None, target_name: str):
    """``(spec, target, graph)`` for a command over every backend; rejects size options the spec
    fixes (``resolve_sizes``)."""
    from attncc.passes.pipeline import lower

    spec = load(spec_path)
    resolve_sizes(spec, batch, seq, seq_k, heads, head_dim)
    return spec, detect_target(target_name), lower(spec)


def each_backend(asked: tuple[str, ...], graph, target):
    """``(name, backend, why not)`` per backend asked for (in order, once each), else per
    registered one: ``backend`` is None, with the reason, where it cannot load or does not
    support ``graph`` on ``target``; BackendError for a name that is not registered."""
    from attncc.backends import registry
    from attncc.errors import BackendError

    names = list(dict.fromkeys(asked)) or registry.names()
    unknown = [name for name in names if name not in registry.names()]
    if unknown:
        raise BackendError(f"unknown backend '{unknown[0]}'; installed: "
                           f"{', '.join(registry.names()) or 'none'}")
    for name in names:
        try:
            backend = registry.get(name)
        except BackendError as err:
            yield name, None, str(err)
            continue
        support = backend.supports(graph, target)
        yield name, backend if support else None, support.reason


def random_call(spec, library: str, target, shape: tuple, dtype: str, seed: int):
    """``(q, k, v, inputs)`` of ``shape`` = ``(batch, seq_q, seq_k, heads, head_dim)`` drawn by
    attncc.testing in ``library`` (torch tensors on the target's device)."""
    from attncc.testing import random_inputs

    batch, seq_q, seq_k, heads, head_dim = shape
    return random_inputs(spec, batch, seq_q, seq_k, dtype, seed, library, target.torch_device,
                         heads=heads, head_dim=head_dim)

