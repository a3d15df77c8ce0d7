"""``attncc viz SPEC -o mask.png``: heat maps of the element mask and of the block plan.

In the style of attention-gym's visualizations: the mask element by element at a small size
(query rows, key columns, kept pairs dark), and beside it the block plan at the given sizes with
each (query block, key block) tile colored FULL, PARTIAL or EMPTY, from the same plan as
``attncc show`` (``show.lowered_plan``). Batch 0, head 0.
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
@size_options(seq=1024)
@block_options
@click.option("--mask-size", type=click.IntRange(min=1, max=4096), default=128,
              show_default=True, help="seq_q = seq_k of the element-mask panel.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random inputs a data-dependent mask reads.")
@click.option("-o", "--output", "out_path", required=True, type=click.Path(dir_okay=False),
              help="The PNG file to write.")
def viz(spec: str, batch: int, seq: int, seq_k: int | None, heads: int | None,
        head_dim: int | None, block_m: int, block_n: int, mask_size: int, seed: int,
        out_path: str) -> None:
    """Draw the mask of SPEC and its block plan (FULL/PARTIAL/EMPTY) as a PNG."""
    from attncc.plan import FULL

    loaded = load(spec)
    writable_parent(out_path)
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
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise AttnccError("attncc viz needs matplotlib: pip install 'attncc[viz]'") from None
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    seq_q, seq_k, block_m, block_n = geometry
    figure = Figure(figsize=(11, 5.2))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    left.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    left.set_title(f"mask, {mask.shape[0]}x{mask.shape[1]} (density {mask.mean():.3f})")
    left.set_xlabel("kv_idx")
    left.set_ylabel("q_idx")
    cmap = ListedColormap(STATE_COLORS)
    right.imshow(states, cmap=cmap, vmin=-0.5, vmax=2.5, interpolation="nearest",
                 aspect="auto", extent=(0, states.shape[1] * block_n, states.shape[0] * block_m,
                                        0))
    right.set_title(f"block plan, {seq_q}x{seq_k} in {block_m}x{block_n} blocks")
    right.set_xlabel("kv_idx")
    right.set_ylabel("q_idx")
    right.legend(handles=[Patch(facecolor=c, edgecolor="#888", label=label) for c, label in
                          zip(STATE_COLORS, ("EMPTY", "PARTIAL", "FULL"), strict=True)],
                 loc="upper right", fontsize=8, framealpha=0.9)
    figure.suptitle(f"{name}: block density {density:.3f}")
    return figure
