"""attncc_dense: an outside attncc backend, written against ``attncc.backends.base`` alone.

It proves the plugin contract is enough: registered through an entry point (``[attncc.backends]
dense = attncc_dense:DenseBackend``), it reads the fused IR node, checks the call with
``attncc.bind.bind``, evaluates mask and score_mod with ``attncc.spec.numeric.evaluate``, and
computes dense scores in torch (softmax or sigmoid), with autograd for the backward. It declares
no ``torch_op``, so ``attncc.integrations.ops.op`` wraps it in the generic custom op.
"""

from __future__ import annotations

import math

import array_api_compat
import torch

from attncc.backends.base import SUPPORTED, Backend, Kernel, SearchSpace, Support
from attncc.backends.config import full_config
from attncc.bind import bind
from attncc.errors import InputError
from attncc.ir.graph import FusedAttention, attention_node
from attncc.spec.numeric import evaluate

#: Input dtype -> the dtype scores are computed in.
COMPUTE = {torch.float16: torch.float32, torch.bfloat16: torch.float32,
           torch.float32: torch.float32, torch.float64: torch.float64}


class DenseKernel(Kernel):
    """Scores materialised ``(B, H, Nq, Nk)``, then score_mod, mask, normalisation, ``@ v``."""

    def __init__(self, spec, node: FusedAttention, config: dict):
        self.backend, self.spec, self.node, self.config = "dense", spec, node, config
        self.source = (f"scores = {node.scale} * q @ k^T; score_mod {node.score_mod}; "
                       f"mask {node.mask.expr if node.mask else None}; {node.normalize}; @ v")
        self.backward = self._backward

    def __call__(self, q, k, v, *, return_lse: bool = False, **inputs):
        bound = bind(self.spec, q, k, v, inputs)
        if return_lse and self.node.normalize != "softmax":
            raise InputError(f"return_lse: the log-sum-exp exists for normalize softmax, not "
                             f"{self.node.normalize}")
        dtype, ct = q.dtype, COMPUTE[q.dtype]
        q, k, v = (x.to(ct) for x in (q, k, v))
        k, v = (x.repeat_interleave(bound.group, dim=1) for x in (k, v))
        ins = {n: (x.to(ct) if x.is_floating_point() else x) for n, x in bound.inputs.items()}
        scores = bound.scale * q @ k.transpose(-1, -2)
        env = {**bound.sizes, **ins, **_indices(scores)}
        xp = array_api_compat.array_namespace(scores)
        if self.node.score_mod is not None:
            value = evaluate(self.node.score_mod, {**env, "score": scores}, xp)
            scores = torch.as_tensor(value, dtype=ct, device=q.device).expand(scores.shape)
        keep = None
        if self.node.mask is not None:
            value = evaluate(self.node.mask.expr, env, xp)
            keep = torch.as_tensor(value, device=q.device).expand(scores.shape)
        if self.node.normalize == "sigmoid":
            weights = torch.sigmoid(scores)
            return ((weights if keep is None else weights * keep) @ v).to(dtype)
        if keep is not None:
            scores = scores.masked_fill(~keep, -math.inf)
        row_max = scores.amax(-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(scores - row_max)
        total = weights.sum(-1, keepdim=True)
        out = ((weights / torch.where(total > 0, total, torch.ones_like(total))) @ v).to(dtype)
        if not return_lse:
            return out
        lse = torch.where(total > 0, row_max + torch.log(total), -math.inf)[..., 0]
        return out, lse.to(dtype)

    def _backward(self, q, k, v, grad_out, **inputs):
        """Gradients of q, k, v and every floating input, by autograd through ``__call__``."""
        names = ["q", "k", "v", *(n for n, x in inputs.items() if x.is_floating_point())]
        leaves = {n: x.detach().requires_grad_(n in names)
                  for n, x in {"q": q, "k": k, "v": v, **inputs}.items()}
        with torch.enable_grad():
            out = self(leaves["q"], leaves["k"], leaves["v"], **{n: leaves[n] for n in inputs})
            grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out,
                                        allow_unused=True)
        return {n: torch.zeros_like(leaves[n]) if g is None else g
                for n, g in zip(names, grads, strict=True)}


def _indices(scores) -> dict:
    """``b, h, q_idx, kv_idx`` as integer tensors broadcasting over the scores' axes."""
    names = ("b", "h", "q_idx", "kv_idx")
    return {name: torch.arange(n, device=scores.device).view([-1 if i == axis else 1
                                                             for i in range(4)])
            for axis, (name, n) in enumerate(zip(names, scores.shape, strict=True))}


class DenseBackend(Backend):
    """Dense dot-product attention in torch (softmax or sigmoid, any mask and score_mod)."""

    name = "dense"
    version = "1"
    library = "torch"

    def supports(self, graph, target) -> Support:
        _, node = attention_node(graph)
        if not isinstance(node, FusedAttention):
            return Support(False, "dense: only the fused (softmax/sigmoid) pattern")
        if node.score != "dot" or node.normalize not in ("softmax", "sigmoid"):
            return Support(False, f"dense: dot-product softmax or sigmoid only, not "
                                  f"{node.score} {node.normalize}")
        if node.memory_tokens or node.projection is not None:
            return Support(False, "dense: no memory tokens or Linformer projection")
        if target is not None and target.kind != "cpu":
            return Support(False, f"dense: cpu targets only, not {target.kind}")
        return SUPPORTED

    def search_space(self, graph, target) -> SearchSpace:
        return SearchSpace({})

    def default_config(self, graph, target) -> dict:
        return {}

    def compile(self, graph, config: dict, target) -> DenseKernel:
        _, node = attention_node(graph)
        return DenseKernel(graph.graph["spec"], node, full_config(self, graph, target, config))
