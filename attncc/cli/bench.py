"""``attncc bench SPEC``: time every installed backend on SPEC next to torch SDPA, in one run.

Each backend's kernel and the peer are timed as the tuner times configs (median after warm-up,
``attncc.tuning.measure``). The peer is ``torch.nn.functional.scaled_dot_product_attention`` on the
same tensors: dense, or with ``is_causal`` when the spec's mask is exactly causal, so the ratio
reads "this variant through attncc against the dense kernel a user would otherwise call". The
side-by-side comparison with compiled FlexAttention lives in ``bench/`` (it compiles for seconds).
"""

from __future__ import annotations

import click

from attncc.cli.options import each_backend, every_backend_options, lowered, random_call


@click.command("bench")
@every_backend_options("Time", seq=1024, batch=1)
@click.option("--repeat", type=click.IntRange(min=1), default=7, show_default=True,
              help="Timed calls per kernel (after 2 warm-up calls).")
def bench(spec: str, batch: int, seq: int, seq_k: int | None, heads: int | None,
          head_dim: int | None, dtype: str, backend_names: tuple[str, ...], target_name: str,
          seed: int, repeat: int) -> None:
    """Time SPEC on every installed backend and on torch SDPA; print medians and ratios."""
    from attncc.api import compile as compile_spec

    loaded, target, graph = lowered(spec, batch, seq, seq_k, heads, head_dim, target_name)
    shape = (batch, seq, seq_k or seq, heads, head_dim)
    rows = []
    for name, backend, reason in each_backend(backend_names, graph, target):
        if backend is None:
            rows.append((name, None, reason))
            continue
        q, k, v, inputs = random_call(loaded, backend.library, target, shape, dtype, seed)
        kernel = compile_spec(loaded, backend=name, target=target, seq=seq, seq_k=seq_k,
                              dtype=dtype)
        rows.append((name, _median(kernel, (q, k, v), inputs, repeat, target), kernel.selection))
    peer = _sdpa_time(loaded, shape, dtype, seed, target, repeat)
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


def _median(fn, args: tuple, kwargs: dict, repeat: int, target) -> float:
    """Median seconds of ``fn(*args, **kwargs)`` after warm-up (attncc.tuning.measure)."""
    from attncc.tuning.measure import time_call

    return time_call(lambda: fn(*args, **kwargs), repeat=repeat, budget_s=60.0,
                     sync=target.sync).median_s


def _sdpa_time(spec, shape: tuple, dtype, seed, target, repeat):
    """``(median seconds, description)`` of torch SDPA on tensors of the same shapes, or None."""
    try:
        import torch.nn.functional as F  # noqa: N812 - the name torch code uses
    except ImportError:
        return None
    q, k, v, _ = random_call(spec, "torch", target, shape, dtype, seed)
    options = {"is_causal": spec.is_causal, "enable_gqa": k.shape[1] != q.shape[1]}
    median = _median(F.scaled_dot_product_attention, (q, k, v), options, repeat, target)
    return median, f"torch SDPA ({'causal' if spec.is_causal else 'dense'}, same shapes)"
