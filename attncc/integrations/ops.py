"""attncc kernels as ``torch.library`` operators: opaque to ``torch.compile``, with autograd.

- ``attncc::attention`` (``torch.library.custom_op``) runs a kernel of the torch backend;
  ``attncc::attention_backward`` its gradients. Both have ``register_fake`` (shapes only) and the
  forward has ``register_autograd``, so ``torch.library.opcheck`` passes and a model calling them
  compiles with ``torch.compile(fullgraph=True)`` without a graph break.
- Every Triton kernel (fused attention, Linformer, linear attention, Nyström) becomes real
  ``torch.library.triton_op``s, one set per spec hash and config (``triton_ops.py``,
  ``triton_linear.py``, ``triton_nystrom.py``); a fused kernel's block plan is built by a separate
  opaque op.

An operator's schema cannot hold a spec, so a spec is compiled once, in eager Python, by ``op``,
and the operator receives a key (a string) naming that compiled kernel in a process-wide table,
and the spec's runtime inputs as a list in the spec's declared order. ``op`` returns the function to
call inside a model: it only calls the operator, so dynamo traces it without breaking.
"""

from __future__ import annotations

import contextlib
import json

import torch

from attncc.errors import InputError
from attncc.integrations import triton_ops
from attncc.spec.load import load_spec

__all__ = ["op"]

_KERNELS: dict = {}
_FORWARD = "(Tensor q, Tensor k, Tensor v, str key, Tensor[] inputs) -> Tensor"
_BACKWARD = "(Tensor q, Tensor k, Tensor v, Tensor grad_out, str key, Tensor[] inputs) -> Tensor[]"


def _kernel(key: str):
    if key not in _KERNELS:
        raise InputError(f"key: no attncc kernel is registered as {key!r}; build the op with "
                         "attncc.integrations.ops.op(spec) first")
    return _KERNELS[key]


def _named(key: str, inputs) -> dict:
    names = tuple(_kernel(key).spec.inputs)
    if len(names) != len(inputs):
        raise InputError(f"inputs: the spec takes {len(names)} inputs ({', '.join(names)}), "
                         f"got {len(inputs)} tensors")
    return dict(zip(names, inputs, strict=True))


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str,
             inputs: list[torch.Tensor]) -> torch.Tensor:
    out = _kernel(key)(q, k, v, **_named(key, inputs)).contiguous()
    return out.clone() if out is q or out is k or out is v else out


def _forward_fake(q, k, v, key, inputs):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor,
              key: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    named = _named(key, inputs)
    with _autograd_on():
        grads = _kernel(key).backward(q, k, v, grad_out, **named)
    floats = [grads[n] for n, x in named.items() if x.is_floating_point()]
    return [g.contiguous() for g in (grads["q"], grads["k"], grads["v"], *floats)]


@contextlib.contextmanager
def _autograd_on():
    """Autograd back on inside an operator's kernel, where the dispatcher may have excluded it
    (AOT-compiled backward graphs run the op below autograd); the kernel's backward recomputes
    tiles and differentiates them locally."""
    key = torch._C.DispatchKey.AutogradFunctionality
    with torch._C._SetExcludeDispatchKeyGuard(key, False), torch.enable_grad():
        yield


def _backward_fake(q, k, v, grad_out, key, inputs):
    return [torch.empty_like(x) for x in (q, k, v, *(x for x in inputs if x.is_floating_point()))]


def _setup_context(ctx, inputs, output):
    q, k, v, key, tensors = inputs
    ctx.key = key
    ctx.save_for_backward(q, k, v, *tensors)


def _make_grad(backward_op):
    def grad(ctx, grad_out):
        q, k, v, *tensors = ctx.saved_tensors
        grads = backward_op(q, k, v, grad_out.contiguous(), ctx.key, list(tensors))
        rest = iter(grads[3:])
        per_input = [next(rest) if x.is_floating_point() else None for x in tensors]
        return grads[0], grads[1], grads[2], None, per_input

    return grad


def _op_pair(name: str):
    """The ``custom_op`` ``attncc::<name>`` and its backward op, with fakes and autograd."""
    forward = torch.library.custom_op(f"attncc::{name}", _forward, mutates_args=(),
                                      schema=_FORWARD)
    forward.register_fake(_forward_fake)
    backward = torch.library.custom_op(f"attncc::{name}_backward", _backward, mutates_args=(),
                                       schema=_BACKWARD)
    backward.register_fake(_backward_fake)
    forward.register_autograd(_make_grad(backward), setup_context=_setup_context)
    return forward, backward


attention, attention_backward = _op_pair("attention")


def op(spec, *, backend: str = "torch", config: dict | None = None):
    """Compile ``spec`` now; return ``fn(q, k, v, **inputs) -> out`` calling the library op.

    ``backend`` is ``"torch"`` (``attncc::attention``) or ``"triton"`` (the ``triton_op``s
    ``attncc::triton_<hash>_<config>`` and their kin for linear attention and Nyström).
    ``fn.op`` is the operator, ``fn.args(q, k, v, **inputs)`` the arguments ``fn`` passes it,
    ``fn.names`` the input order, ``fn.key`` the kernel's key; ``fn.ops`` the ``triton_ops`` set
    (plan, forward, backward) or None.
    """
    from attncc.api import compile as compile_spec

    if backend not in ("torch", "triton"):
        raise InputError(f"backend: expected 'torch' or 'triton', got {backend!r}")
    spec = load_spec(spec)
    key = f"{backend}:{spec.name}:{spec.hash}:{json.dumps(config or {}, sort_keys=True)}"
    if key not in _KERNELS:
        _KERNELS[key] = compile_spec(spec, backend=backend, config=config)
    names = tuple(spec.inputs)
    ops = None
    if backend == "torch":
        target = attention
    else:
        ops = triton_ops.triton_ops(_KERNELS[key])
        target = ops.forward

    def args(q, k, v, **inputs):
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise InputError(f"inputs: the spec '{spec.name}' takes {list(names)}; missing "
                             f"{missing}, unexpected {extra}")
        tensors = [inputs[n] for n in names]
        return ops.args(q, k, v, tensors) if ops is not None else (q, k, v, key, tensors)

    def fn(q, k, v, **inputs):
        result = target(*args(q, k, v, **inputs))
        return result[0] if ops is not None else result

    fn.key, fn.op, fn.names, fn.spec, fn.args, fn.ops = key, target, names, spec, args, ops
    fn.__name__ = f"attncc_op_{spec.name}"
    return fn
