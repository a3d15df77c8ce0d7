"""``attncc viz SPEC -o mask.png``: heat maps of the element mask and of the block plan, or with
``--inputs in.npz`` the attention maps of those inputs.

In the style of attention-gym's visualizations: the mask element by element at a small size
(query rows, key columns, kept pairs dark), and beside it the block plan at the given sizes with
each (query block, key block) tile colored FULL, PARTIAL or EMPTY, from the same plan as
``attncc show`` (``show.lowered_plan``). Batch 0, head 0.

``--inputs`` (an ``.npz`` with ``q``, ``k``, ``v`` and the spec's inputs by name) draws the exact
attention weights (``attncc.attention_map``, numpy backend) of batch 0: one panel per head of
``--heads`` (e.g. ``0,3``), the query rows ``--rows`` (``0:64``, ``5,9``; default all), a linear
or ``--log`` colour scale, and the outline of the block plan's PARTIAL (dashed) and FULL blocks.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from attncc.cli.options import block_options, load, resolve_sizes, size_options, spec_argument
from attncc.cli.run import writable_parent
from attncc.cli.show import lowered_plan, plan_inputs
from attncc.errors import AttnccError

STATE_COLORS = ("#f7f7f7", "#f4a261", "#264653")  # EMPTY, PARTIAL, FULL


@click.command("viz")
@spec_argument
@size_options(seq=1024, heads=False)
@click.option("--heads", "heads", default=None, metavar="N | H,H..",
              help="Without --inputs: query heads where the spec leaves them open (default "
                   "4). With --inputs: the query heads to draw (default 0).")
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
              default=None, help="An .npz with q, k, v and the spec's inputs: draw its maps.")
@click.option("--rows", default=None, metavar="A:B | I,J..",
              help="With --inputs: the query rows to draw (default all).")
@click.option("--log", "log_scale", is_flag=True, help="With --inputs: log colour scale.")
@block_options
@click.option("--mask-size", type=click.IntRange(min=1, max=4096), default=128,
              show_default=True, help="seq_q = seq_k of the element-mask panel.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random inputs a data-dependent mask reads.")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The PNG file to write.")
def viz(spec: str, batch: int, seq: int, seq_k: int | None, heads: str | None,
        inputs_path: str | None, rows: str | None, log_scale: bool, head_dim: int | None,
        block_m: int, block_n: int, mask_size: int, seed: int, out_path: str) -> None:
    """Draw the mask of SPEC and its block plan (FULL/PARTIAL/EMPTY), or with --inputs its
    attention maps, as a PNG."""
    from attncc.plan import FULL

    loaded = load(spec)
    writable_parent(out_path)
    if inputs_path is not None:
        click.echo(draw_maps(loaded, inputs_path, heads or "0", rows, log_scale, block_m,
                             block_n, out_path))
        return
    if heads is not None and not heads.isdigit():
        raise AttnccError(f"--heads: expected a number of heads without --inputs, got {heads!r}")
    heads = None if heads is None else int(heads)
    sizes = resolve_sizes(loaded, batch, seq, seq_k, heads, head_dim)
    _, node, plan, _ = lowered_plan(loaded, sizes, block_m, block_n, seed)
    small = resolve_sizes(loaded, batch, mask_size, mask_size, heads, head_dim)
    mask = element_mask(loaded, small, plan_inputs(loaded, node, small, seed))
    if plan is None:  # a node without a block plan reads every key block
        n_q, n_k = -(-sizes["seq_q"] // block_m), -(-sizes["seq_k"] // block_n)
        states, density, geometry = (np.full((n_q, n_k), FULL, np.int8), 1.0,
                                     (sizes["seq_q"], sizes["seq_k"], block_m, block_n))
    else:
        states, density = plan.states[0, 0], float(plan.block_density())
        geometry = (plan.seq_q, plan.seq_k, block_m, block_n)
    figure = draw(loaded.name, mask, states, density, geometry)
    path = Path(out_path)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    note = "" if plan is not None else f"; {node.op_name} has no block plan"
    click.echo(f"wrote {path} (mask density {mask.mean():.3f} at {mask_size}x{mask_size}, "
               f"block density {density:.3f} at {geometry[0]}x{geometry[1]}{note})")


def element_mask(spec, sizes: dict[str, int], inputs: dict | None) -> np.ndarray:
    """Bool (seq_q, seq_k) of kept pairs for batch 0, head 0 (all True without a mask)."""
    from attncc.reference import kept_pairs

    shape = (1, 1, sizes["seq_q"], sizes["seq_k"])
    return np.asarray(kept_pairs(spec, sizes, inputs or {}, shape, np), dtype=bool)[0, 0]


def draw(name: str, mask: np.ndarray, states: np.ndarray, density: float, geometry: tuple):
    """A matplotlib Figure with the two panels; Agg backend, nothing shown on screen."""
    figure = _canvas(figsize=(11, 5.2))
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    seq_q, seq_k, block_m, block_n = geometry
    left, right = figure.subplots(1, 2)
    left.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    left.set_title(f"mask, {mask.shape[0]}x{mask.shape[1]} (density {mask.mean():.3f})")
    cmap = ListedColormap(STATE_COLORS)
    right.imshow(states, cmap=cmap, vmin=-0.5, vmax=2.5, interpolation="nearest",
                 aspect="auto", extent=(0, states.shape[1] * block_n, states.shape[0] * block_m,
                                        0))
    right.set_title(f"block plan, {seq_q}x{seq_k} in {block_m}x{block_n} blocks")
    for ax in (left, right):
        ax.set_xlabel("kv_idx")
        ax.set_ylabel("q_idx")
    right.legend(handles=[Patch(facecolor=c, edgecolor="#888", label=label) for c, label in
                          zip(STATE_COLORS, ("EMPTY", "PARTIAL", "FULL"), strict=True)],
                 loc="upper right", fontsize=8, framealpha=0.9)
    figure.suptitle(f"{name}: block density {density:.3f}")
    return figure


def _picks(text: str | None, n: int, option: str) -> list[int] | None:
    """``A:B`` (a slice) or ``I,J,..`` as a list of ints; None for None. Ranges are checked by
    ``attention_map``."""
    if text is None:
        return None
    try:
        if ":" in text:
            return list(range(n))[slice(*(int(p) if p else None for p in text.split(":")))]
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise AttnccError(f"{option}: expected A:B or I,J,... (integers), got {text!r}") from None


def draw_maps(spec, inputs_path: str, heads: str, rows: str | None, log_scale: bool,
              block_m: int, block_n: int, out_path: str) -> str:
    """Write the attention maps of the arrays in ``inputs_path`` to ``out_path``; the line
    ``attncc viz`` prints."""
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    from attncc.api import attention_map
    from attncc.bind import bind
    from attncc.cli.run import read_npz
    from attncc.ir.graph import FusedAttention, attention_node
    from attncc.passes.pipeline import lower
    from attncc.plan import EMPTY, FULL, build_plan

    arrays = read_npz(inputs_path, spec)  # the checks of ``attncc run``
    q, k, v = (arrays.pop(n) for n in ("q", "k", "v"))
    sizes = bind(spec, q, k, v, arrays).sizes
    head_list = _picks(heads, sizes["heads"], "--heads")
    row_list = _picks(rows, sizes["seq_q"], "--rows")
    maps = np.asarray(attention_map(spec, q[:1], k[:1], v[:1], heads=head_list, rows=row_list,
                                    backend="numpy", **arrays))[0]
    row_list = row_list or list(range(sizes["seq_q"]))
    _, node = attention_node(lower(spec))
    plan = None
    if isinstance(node, FusedAttention) and node.projection is None:
        plan = build_plan(node, sizes, block_m, block_n, arrays)
    width = 4.2 * min(max(maps.shape[-1] / max(len(row_list), 1), 0.6), 1.6)  # per panel
    figure = _canvas(figsize=(width * len(head_list) + 1.2, 4.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(head_list), squeeze=False)[0])
    positive = maps[maps > 0]
    norm = (LogNorm(vmin=max(positive.min(), positive.max() * 1e-6), vmax=positive.max())
            if log_scale and positive.size else Normalize(vmin=min(maps.min(), 0),
                                                         vmax=maps.max()))
    memory = spec.memory_tokens
    contiguous = row_list == list(range(row_list[0], row_list[0] + len(row_list)))
    for ax, head, panel in zip(axes, head_list, maps, strict=True):
        shown = np.where(panel > 0, panel, np.nan) if log_scale else panel
        image = ax.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest",
                          aspect="auto", extent=(0, panel.shape[1], row_list[0] + len(row_list)
                                                 if contiguous else len(row_list),
                                                 row_list[0] if contiguous else 0))
        ax.set_title(f"head {head}")
        ax.set_xlabel("key (memory tokens first)" if memory else "kv_idx")
        ax.set_ylabel("q_idx")
        if not contiguous:
            ax.set_yticks([i + 0.5 for i in range(len(row_list))], labels=row_list)
        if plan is not None and contiguous:
            states = plan.states[0, 0 if plan.states.shape[1] == 1 else head]
            for (m, n), state in np.ndenumerate(states):
                if state != EMPTY:
                    ax.add_patch(Rectangle((memory + n * block_n, m * block_m), block_n, block_m,
                                           fill=False, lw=0.6, ec="#e76f51",
                                           ls="-" if state == FULL else "--"))
            ax.set_ylim(row_list[0] + len(row_list), row_list[0])
            ax.set_xlim(0, panel.shape[1])
    figure.colorbar(image, ax=axes, shrink=0.85, label="weight" + (" (log)" if log_scale else ""))
    outline = (f"; block plan {block_m}x{block_n}: FULL solid, PARTIAL dashed"
               if plan is not None and contiguous else "")
    figure.suptitle(f"{spec.name}: attention maps, batch 0{outline}")
    figure.savefig(out_path, dpi=110, bbox_inches="tight")
    return (f"wrote {out_path} (maps of heads {', '.join(map(str, head_list))}, {len(row_list)} "
            f"rows x {maps.shape[-1]} keys, max weight {maps.max():.3g})")


def _canvas(**options):
    """A matplotlib Figure of ``options`` on the Agg canvas (nothing shown on screen)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise AttnccError("attncc viz needs matplotlib: pip install 'attncc[viz]'") from None
    from matplotlib.figure import Figure

    figure = Figure(**options)
    FigureCanvasAgg(figure)
    return figure
