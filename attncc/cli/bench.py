"""``attncc bench SPEC``: time every installed backend on SPEC next to torch SDPA, in one run.

Each backend's kernel and the peer are timed as the tuner times configs (median after warm-up,
``attncc.tuning.measure``). The peer is ``torch.nn.functional.scaled_dot_product_attention`` on the
same tensors: dense, or with ``is_causal`` when the spec's mask is exactly causal, so the ratio
reads "this variant through attncc against the dense kernel a user would otherwise call". The
side-by-side comparison with compiled FlexAttention lives in ``bench/`` (it compiles for seconds).
"""

from __future__ import annotations

import click

from attncc.cli.options import (
    checked_backends,
    detect_target,
    dtype_option,
    load,
    resolve_sizes,
    size_options,
    spec_argument,
    target_option,
)


@click.command("bench")
@spec_argument
@size_options(seq=1024, batch=1)
@dtype_option()
@click.option("--backend", "backend_names", multiple=True, metavar="NAME",
              help="Time only this backend (repeatable); default: every installed one.")
@click.option("--repeat", type=click.IntRange(min=1), default=7, show_default=True,
              help="Timed calls per kernel (after 2 warm-up calls).")
@target_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the inputs.")
def bench(spec: str, batch: int, seq: int, seq_k: int | None, heads: int | None,
          head_dim: int | None, dtype: str, backend_names: tuple[str, ...], repeat: int,
          target_name: str, seed: int) -> None:
    """Time SPEC on every installed backend and on torch SDPA; print medians and ratios."""
    from attncc.api import compile as compile_spec
    from attncc.backends import registry
    from attncc.errors import BackendError
    from attncc.passes.pipeline import lower
    from attncc.testing import random_inputs

    loaded = load(spec)
    resolve_sizes(loaded, batch, seq, seq_k, heads, head_dim)
    target = detect_target(target_name)
    graph = lower(loaded)
    device = "cuda" if target.kind == "cuda" else None
    names = checked_backends(backend_names)
    rows = []
    for name in names:
        try:
            backend = registry.get(name)
        except BackendError as err:
            rows.append((name, None, str(err)))
            continue
        support = backend.supports(graph, target)
        if not support:
            rows.append((name, None, support.reason))
            continue
        library = backend.library
        q, k, v, inputs = random_inputs(loaded, batch, seq, seq_k or seq, dtype, seed, library,
                                        device, heads=heads, head_dim=head_dim)
        kernel = compile_spec(loaded, backend=name, target=target, seq=seq, seq_k=seq_k,
                              dtype=dtype)
        rows.append((name, _median(kernel, (q, k, v), inputs, repeat, device), kernel.selection))
    peer = _sdpa_time(loaded, batch, seq, seq_k or seq, heads, head_dim, dtype, seed, device,
                      repeat)
    click.echo(f"{loaded.name}: {dtype}, batch {batch}, seq_q {seq}, seq_k {seq_k or seq}, "
               f"target {target.key(1)}")
    click.echo(f"{'kernel':<8} {'median ms':>10} {'vs SDPA':>8}  note")
    for name, median, note in rows:
        if median is None:
            click.echo(f"{name:<8} {'-':>10} {'-':>8}  skipped: {note}")
        else:
            ratio = f"{median / peer[0]:.2f}x" if peer else "-"
            click.echo(f"{name:<8} {median * 1e3:10.3f} {ratio:>8}  {note}")
    if peer:
        click.echo(f"{'sdpa':<8} {peer[0] * 1e3:10.3f} {'1.00x':>8}  {peer[1]}")


def _median(fn, args: tuple, kwargs: dict, repeat: int, device) -> float:
    """Median seconds of ``fn(*args, **kwargs)`` after warm-up (attncc.tuning.measure)."""
    from attncc.tuning.measure import time_call

    return time_call(lambda: fn(*args, **kwargs), repeat=repeat, budget_s=60.0,
                     sync=_sync(device)).median_s


def _sync(device):
    if device != "cuda":
        return None
    import torch

    return torch.cuda.synchronize


def _sdpa_time(spec, batch, seq_q, seq_k, heads, head_dim, dtype, seed, device, repeat):
    """``(median seconds, description)`` of torch SDPA on tensors of the same shapes, or None."""
    try:
        import torch.nn.functional as F  # noqa: N812 - the name torch code uses
    except ImportError:
        return None
    from attncc.testing import random_inputs

    q, k, v, _ = random_inputs(spec, batch, seq_q, seq_k, dtype, seed, "torch", device,
                               heads=heads, head_dim=head_dim)
    options = {"is_causal": spec.is_causal, "enable_gqa": k.shape[1] != q.shape[1]}
    median = _median(F.scaled_dot_product_attention, (q, k, v), options, repeat, device)
    return median, f"torch SDPA ({'causal' if spec.is_causal else 'dense'}, same shapes)"
