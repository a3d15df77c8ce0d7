"""Plug an attncc spec into a tiny Llama (random weights, no download) and train a few steps.

    python examples/scripts/train_tiny_llama.py [--spec examples/sliding_window.yaml] [--steps 8]

The spec replaces the model's attention pattern (``register(name, spec=...)``); the task is to
copy a random sequence, so the loss falls within a few steps. Runs on CPU in seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attncc.errors import AttnccError
from attncc.integrations.transformers import register

EXAMPLES = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(EXAMPLES / "sliding_window.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seq", type=int, default=48)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        name = register("attncc_example", spec=args.spec)
    except AttnccError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4 * args.seq, attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    half = args.seq // 2
    losses = []
    for step in range(args.steps):
        prefix = torch.randint(2, 32, (4, half))
        ids = torch.cat([prefix, prefix], dim=1)  # second half repeats the first
        labels = ids.clone()
        labels[:, :half] = -100
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.2f}s)")
    print(f"attention: {name} ({Path(args.spec).name}); loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
