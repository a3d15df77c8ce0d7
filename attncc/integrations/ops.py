"""attncc kernels as ``torch.library`` operators: opaque to ``torch.compile``, with autograd.

``op(spec, backend=..., config=...)`` compiles the spec once, in eager Python, and returns
``fn(q, k, v, **inputs) -> out`` for use inside a model. While ``torch.compile`` traces it, a
call the kernel's ``Kernel.traceable`` function serves (the torch backend's sdpa path: dense and
causal softmax, GQA, no runtime inputs) is that function's plain torch ops, so the compiler sees
``scaled_dot_product_attention`` and its own backward; every other call, and every eager call,
is a library op. A kernel that offers its own operators (``Kernel.torch_op``) is called through
them; any other kernel that takes torch tensors is wrapped in the one generic pair:

- ``attncc::attention(q, k, v, key, inputs) -> Tensor`` (``torch.library.custom_op``) runs the
  kernel's ``__call__``; ``attncc::attention_backward`` its ``backward``. Both have
  ``register_fake`` (shapes only) and the forward has ``register_autograd``, so
  ``torch.library.opcheck`` passes and a model calling them compiles with
  ``torch.compile(fullgraph=True)`` without a graph break.

An operator's schema cannot hold a spec, so the generic operator receives a key (a string)
naming the compiled kernel in a process-wide table, and the spec's runtime inputs as a list in
the spec's declared order.
"""

from __future__ import annotations

import contextlib
import json

import torch

from attncc.errors import InputError
from attncc.spec.load import load_spec

__all__ = ["OpTable", "op"]

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
    named, kernel = _named(key, inputs), _kernel(key)
    if kernel.backward is None:
        raise InputError(f"backward: the {kernel.backend} kernel of '{kernel.spec.name}' has "
                         "no gradients")
    with _autograd_on():
        grads = kernel.backward(q, k, v, grad_out, **named)
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
    # contiguous, as ``_backward`` returns them (inductor checks the real strides against these)
    return [x.new_empty(x.shape) for x in (q, k, v, *(x for x in inputs if x.is_floating_point()))]


def _setup_context(ctx, inputs, output):
    q, k, v, key, tensors = inputs
    ctx.key = key
    ctx.save_for_backward(q, k, v, *tensors)


def _grad(ctx, grad_out):
    q, k, v, *tensors = ctx.saved_tensors
    grads = attention_backward(q, k, v, grad_out.contiguous(), ctx.key, list(tensors))
    rest = iter(grads[3:])
    return (*grads[:3], None, [next(rest) if x.is_floating_point() else None for x in tensors])


attention = torch.library.custom_op("attncc::attention", _forward, mutates_args=(),
                                    schema=_FORWARD)
attention.register_fake(_forward_fake)
attention_backward = torch.library.custom_op("attncc::attention_backward", _backward,
                                             mutates_args=(), schema=_BACKWARD)
attention_backward.register_fake(_backward_fake)
attention.register_autograd(_grad, setup_context=_setup_context)


def op(spec, *, backend: str = "torch", config: dict | None = None):
    """Compile ``spec`` now; return ``fn(q, k, v, **inputs) -> out`` calling library ops, or,
    under ``torch.compile``, the kernel's ``traceable`` function where it serves the call.

    ``backend`` must take torch tensors (``Backend.library``). The kernel's own operators
    (``Kernel.torch_op``) are used where it has them, else ``attncc::attention``. ``fn.key`` is
    the kernel's key, ``fn.names`` the input order, ``fn.kernel`` the kernel; ``fn.op`` the
    forward operator and ``fn.args(q, k, v, **inputs)`` its arguments for a call (for opcheck
    and tests), ``fn.ops`` whatever the kernel's ``torch_op`` names (None for the generic op).
    """
    from attncc.api import compile as compile_spec
    from attncc.backends import registry

    library = registry.get(backend).library
    if library != "torch":
        raise InputError(f"backend: '{backend}' computes on {library} arrays; a torch.library "
                         "op needs a backend whose library is torch")
    spec = load_spec(spec)
    key = f"{backend}:{spec.name}:{spec.hash}:{json.dumps(config or {}, sort_keys=True)}"
    if key not in _KERNELS:
        _KERNELS[key] = compile_spec(spec, backend=backend, config=config)
    kernel, names = _KERNELS[key], tuple(spec.inputs)
    own = kernel.torch_op() or _generic(key, names)
    traced = kernel.traceable()

    def checked(inputs: dict) -> dict:
        missing = [n for n in names if n not in inputs]
        extra = [n for n in inputs if n not in names]
        if missing or extra:
            raise InputError(f"inputs: the spec '{spec.name}' takes {list(names)}; missing "
                             f"{missing}, unexpected {extra}")
        return inputs

    def fn(q, k, v, **inputs):
        inputs = checked(inputs)
        if traced is not None and torch.compiler.is_compiling():
            out = traced(q, k, v, **inputs)
            if out is not None:
                return out
        return own(q, k, v, **inputs)

    fn.key, fn.names, fn.spec, fn.kernel = key, names, spec, kernel
    fn.op, fn.ops = getattr(own, "op", None), getattr(own, "ops", None)
    fn.args = ((lambda q, k, v, **inputs: own.args(q, k, v, **checked(inputs)))
               if hasattr(own, "args") else None)
    fn.__name__ = f"attncc_op_{spec.name}"
    return fn


class OpTable:
    """Op functions (``op``'s results) of the compiled calls, as attributes named by their key
    (an identifier: dynamo's attribute sources take no dots).

    The integrations fill it from an ``assume_constant_result`` function at trace time and call
    ``getattr(table, key)(...)`` in traced code: dynamo reads an object's attribute afresh at each
    access, where it would snapshot a dict at its first read in a trace and miss an entry that a
    later layer's call adds (Gemma-2's second, global layer).
    """


def _generic(key: str, names: tuple):
    """``fn`` calling ``attncc::attention`` on the kernel registered as ``key``."""
    def fn(q, k, v, **inputs):
        return attention(q, k, v, key, [inputs[n] for n in names])

    fn.op, fn.ops = attention, None
    fn.args = lambda q, k, v, **inputs: (q, k, v, key, [inputs[n] for n in names])
    return fn
