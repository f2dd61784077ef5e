"""One declaration per op: ``define(OpSpec(...))`` makes everything an op needs.

From one ``OpSpec`` (the schema, the checks, the outputs, the eager reference and the kernels)
``define`` creates:

- the torch custom op ``torch.ops.qwen.<name>`` (the schema gains ``str backend="auto"``) and its
  fake, which runs the same checks and allocates the same outputs;
- the op's backend table in ``qwen_kernels._backends.REGISTRY`` (what ``available_backends()``
  lists and ``"auto"`` picks from);
- the documented public function ``qwen_kernels.<name>``, with the schema's arguments and defaults.

Calls are memoised by a key derived from the schema: the backend, each tensor's dtype, shape,
strides and device, lists as tuples, the other arguments as they are. The checks read nothing
else (they see only what the key holds), so a call whose key was seen before skips the checks and
the backend selection; values of device tensors are checked on every call (``check_values``).
The key and the two functions are generated from the parsed schema, so no op writes one by hand
and none pays for a generic loop over its arguments on every call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .._backends import REGISTRY, OpBackends
from .._checks import value_checks_enabled, values_readable

# Python annotations of the schema types, for the public functions' signatures.
_ANNOTATIONS = {
    "Tensor": "Tensor",
    "Optional[Tensor]": "Tensor | None",
    "float": "float",
    "Optional[float]": "float | None",
    "int": "int",
    "SymInt": "int",
    "List[int]": "list[int]",
    "Optional[List[int]]": "list[int] | None",
    "str": "str",
    "bool": "bool",
}


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op, stated once.

    Attributes:
        name: the op's name in the ``qwen`` namespace, e.g. ``"rms_norm"``.
        schema: its arguments and results without ``backend``, e.g.
            ``"(Tensor x, Tensor weight, float eps) -> Tensor"``; ``Tensor(a!)`` marks an
            argument the op writes in place.
        doc: the public function's docstring.
        reference: the eager implementation (the ``"torch"`` backend), taking the op's arguments.
        check: raises ``ValueError`` naming the argument on bad dtypes, shapes or devices; reads
            only what the memo key holds (never values of tensors).
        outputs: allocates the results as the op returns them (contiguous); the fake runs it.
        kernels: other backends' implementations, ``"module:function"`` strings imported on
            first use, e.g. ``{"triton": "qwen_kernels.triton_kernels.rms_norm:rms_norm"}``.
        native: the C++ op of the same name is the ``"cuda"`` and ``"cuda_emu"`` backend (one
            kernel source, compiled by nvcc and by the emulation), bound when first resolved.
        check_values: checks of tensor values (a host sync), run on every call unless inside
            ``skip_value_checks()``, while torch.compile traces or while a CUDA graph captures
            (``values_readable``).
        defaults: defaults that depend on the inputs, by argument name: a function of the first
            tensor argument giving the value where the caller passed None (the softmax scale
            from the head dim). Filled in before any implementation runs, so none computes it.
        misfit, auto_impl, auto_note, auto_order: how ``"auto"`` chooses (see ``OpBackends``).
        autograd: the op's derivative (``Autograd``), or None for an op autograd cannot go
            through. An op that writes an argument in place raises when called with grad
            enabled on an input that requires grad, instead of leaving autograd a stale graph.
        train_with: instead of ``autograd``, the op that runs in this one's place when a
            gradient is needed: it takes the same arguments, returns this op's output first and
            what its backward needs after it (window_attn: the log-sum-exp of each row), and
            carries the autograd formula. Calls without a gradient keep this op's kernels.
    """

    name: str
    schema: str
    doc: str
    reference: Callable
    check: Callable[..., None]
    outputs: Callable[..., Any]
    kernels: Mapping[str, str] = field(default_factory=dict)
    native: bool = False
    check_values: Callable[..., None] | None = None
    defaults: Mapping[str, Callable[[torch.Tensor], Any]] = field(default_factory=dict)
    misfit: Callable[[str, int], str | None] | None = None
    auto_impl: Callable | None = None
    auto_note: str = ""
    auto_order: Callable[[tuple], tuple[str, ...] | None] | None = None
    autograd: Autograd | None = None
    train_with: str | None = None


@dataclass(frozen=True)
class Autograd:
    """How an op differentiates (``torch.library.register_autograd``).

    Attributes:
        save: ``save(ctx, inputs, output)``, run in the forward when a gradient is needed:
            keeps what the backward needs (``ctx.save_for_backward``, attributes) and raises on
            an input that requires grad but is not differentiable. ``inputs`` are the op's
            arguments, ``backend`` last (``ctx.backend`` is set to it before).
        backward: ``backward(ctx, *grads)``: one gradient (or None) per argument of the schema,
            in the inputs' dtypes. It calls ops with ``backward_backend(op, ctx.backend)``.
    """

    save: Callable[..., None]
    backward: Callable[..., tuple]


def backward_backend(op: str, backend: str) -> str:
    """The backend a backward runs ``op`` on: the forward's where ``op`` has it, else "auto"
    (a backend that the backward op has no kernels for)."""
    return backend if backend in REGISTRY[op].impls else "auto"


@functools.cache
def op_schema(op: str) -> torch.FunctionSchema:
    """The parsed schema of a declared op (without ``backend``), parsed once."""
    return torch._C.parse_schema(f"qwen::{op}{SPECS[op].schema}")


def not_differentiable(op: str, inputs: tuple, *names: str) -> None:
    """Raise ``ValueError`` when one of the arguments ``names`` of ``op`` (tensors or None, in
    the schema's order of ``inputs``) requires grad."""
    for arg, value in zip(op_schema(op).arguments, inputs, strict=False):
        if arg.name in names and isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError(
                f"qwen.{op}: `{arg.name}` must not require grad (the op has no gradient for "
                "it), got a tensor that requires grad"
            )


# Every op's declaration, by op name (tools read the checks, defaults and outputs from here).
SPECS: dict[str, OpSpec] = {}


def prepared(op: str, args: tuple) -> tuple:
    """``args`` of ``op`` (without ``backend``) as its implementations receive them: with the
    defaults that depend on the inputs filled in (``OpSpec.defaults``)."""
    spec, schema = SPECS[op], op_schema(op)
    first = next(a for a in args if isinstance(a, torch.Tensor))
    return tuple(
        spec.defaults[arg.name](first) if value is None and arg.name in spec.defaults else value
        for arg, value in zip(schema.arguments, args, strict=True)
    )


def _key_part(arg: torch.Argument) -> str:
    """The memo-key expression of one argument."""
    name, kind = arg.name, str(arg.type)
    if kind == "Tensor":
        return f"{name}.dtype, {name}.shape, {name}.stride(), {name}.device"
    if kind == "Optional[Tensor]":
        return (
            f"None if {name} is None else "
            f"({name}.dtype, {name}.shape, {name}.stride(), {name}.device)"
        )
    if kind == "List[int]":
        return f"tuple({name})"
    if kind == "Optional[List[int]]":
        return f"None if {name} is None else tuple({name})"
    return name


def _finish(returns: list) -> str:
    """The expression that makes the implementation's results contiguous."""
    if not returns:
        return "None"
    if len(returns) == 1:
        return "out.contiguous()"
    return "(" + ", ".join(f"out[{i}].contiguous()" for i in range(len(returns))) + ")"


def _parameters(arguments: list, annotated: bool = True) -> str:
    """The schema's arguments as a Python parameter list, with their defaults (the dispatcher
    leaves out trailing arguments that equal their default)."""
    parts = []
    for arg in arguments:
        text = f"{arg.name}: {_ANNOTATIONS[str(arg.type)]}" if annotated else arg.name
        if arg.has_default_value():
            text += f" = {arg.default_value!r}"
        parts.append(text)
    return ", ".join(parts)


def _return_annotation(returns: list) -> str:
    if not returns:
        return "None"
    if len(returns) == 1:
        return "Tensor"
    return "tuple[" + ", ".join("Tensor" for _ in returns) + "]"


def _generate(spec: OpSpec, table: OpBackends, overload: Callable | None) -> dict[str, Any]:
    """The op's implementation (``impl``), its fake (``fake``: the checks and the outputs) and,
    once ``overload`` exists, its public function."""
    schema = op_schema(spec.name)
    arguments, returns = schema.arguments, schema.returns
    names = ", ".join(arg.name for arg in arguments)
    key = ", ".join(["backend", *(_key_part(arg) for arg in arguments)])
    lines = [
        "from __future__ import annotations",
        f"def impl({_parameters(arguments, annotated=False)}, backend='auto'):",
        f"    key = ({key})",
        "    run = resolved.get(key)",
        "    if run is None:",
        f"        run = table.resolve(key, backend, ({names},))",
    ]
    first_tensor = next(arg.name for arg in arguments if str(arg.type) == "Tensor")
    if spec.check_values is not None:
        lines.append(f"    if value_checks_enabled() and values_readable({first_tensor}):")
        lines.append(f"        check_values({names})")
    for name in spec.defaults:
        lines.append(f"    if {name} is None:")
        lines.append(f"        {name} = default_{name}({first_tensor})")
    lines.append(f"    out = run({names})" if returns else f"    run({names})")
    lines.append(f"    return {_finish(returns)}")
    lines += [
        f"def fake({_parameters(arguments, annotated=False)}, backend='auto'):",
        f"    check({names})",
        f"    return outputs({names})",
    ]
    if overload is not None:
        lines += [
            f"def {spec.name}({_parameters(arguments)}, backend: str = 'auto')"
            f" -> {_return_annotation(returns)}:",
            f"    return overload({names}, backend)",
        ]
    namespace = {
        "resolved": table.resolved,
        "table": table,
        "check": spec.check,
        "outputs": spec.outputs,
        "check_values": spec.check_values,
        "value_checks_enabled": value_checks_enabled,
        "values_readable": values_readable,
        "overload": overload,
        **{f"default_{name}": default for name, default in spec.defaults.items()},
    }
    exec(compile("\n".join(lines), f"<qwen op {spec.name}>", "exec"), namespace)
    return namespace


def define(spec: OpSpec) -> Callable:
    """Create the custom op ``qwen::<spec.name>``, its fake, its backend table and its public
    function (returned) from ``spec``."""
    table = OpBackends(
        spec.name,
        {"torch": spec.reference},
        check=spec.check,
        misfit=spec.misfit,
        auto_impl=spec.auto_impl,
        auto_note=spec.auto_note,
        auto_order=spec.auto_order,
    )
    for backend, impl in spec.kernels.items():
        table.register(backend, impl)
    if spec.native:
        for backend in ("cuda", "cuda_emu"):
            table.register(backend, OpBackends.native(spec.name))
    REGISTRY[spec.name] = table
    SPECS[spec.name] = spec

    schema = op_schema(spec.name)
    mutated = tuple(arg.name for arg in schema.arguments if arg.is_write)
    full_schema = spec.schema.replace(") ->", ', str backend="auto") ->', 1)
    generated = _generate(spec, table, None)
    op = torch.library.custom_op(
        f"qwen::{spec.name}", generated["impl"], mutates_args=mutated, schema=full_schema
    )
    op.register_fake(generated["fake"])
    if spec.autograd is not None:
        _register_autograd(op, spec.autograd)
    elif spec.train_with is not None:
        _train_with(spec.name, spec.train_with)
    elif mutated:
        _refuse_grad_in_place(spec.name)
    public = _generate(spec, table, getattr(torch.ops.qwen, spec.name).default)[spec.name]
    public.__doc__ = spec.doc
    public.__module__ = "qwen_kernels"
    return public


def _register_autograd(op: Any, autograd: Autograd) -> None:
    def save(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.backend = inputs[-1]
        autograd.save(ctx, inputs, output)

    def backward(ctx: Any, *grads: Any) -> tuple:
        return (*autograd.backward(ctx, *grads), None)  # no gradient for `backend`

    op.register_autograd(backward, setup_context=save)


# Kernels of the Autograd key that replace custom_op's own (registered after it): the in-place
# guards and the training forwards.
_AUTOGRAD_KERNELS = torch.library.Library("qwen", "IMPL")
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset


def needs_grad(*args: Any) -> bool:
    """Whether autograd records an op on ``args``: grad mode on and a tensor among them that
    requires grad (the test that picks a training forward or refuses an in-place write, and
    that callers use to pick an op's out-of-place form)."""
    return torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    )


def _train_with(name: str, training: str) -> None:
    """Where a gradient is needed, ``qwen::<name>`` runs ``qwen::<training>`` (same arguments,
    this op's output first) on the backend its backward maps to; otherwise its own kernels."""
    overload = getattr(torch.ops.qwen, name).default
    training_op = getattr(torch.ops.qwen, training).default
    # The dispatcher leaves out trailing arguments that equal their defaults.
    defaults = [arg.default_value for arg in overload._schema.arguments]

    def forward(keyset: Any, *args: Any) -> Any:
        if needs_grad(*args):
            *inputs, backend = (*args, *defaults[len(args) :])
            return training_op(*inputs, backward_backend(training, backend))[0]
        return overload.redispatch(keyset & _BELOW_AUTOGRAD, *args)

    _AUTOGRAD_KERNELS.impl(name, forward, "Autograd", with_keyset=True)


def _refuse_grad_in_place(name: str) -> None:
    """Make ``qwen::<name>`` (which writes an argument in place) raise when grad mode is on and a
    tensor argument requires grad: autograd would keep the graph of the values before the write
    and return a silently wrong gradient."""
    overload = getattr(torch.ops.qwen, name).default

    def guard(keyset: Any, *args: Any, **kwargs: Any) -> Any:
        if needs_grad(*args):
            raise RuntimeError(
                f"qwen.{name} writes its inputs in place, which autograd cannot follow, and an "
                f"input requires grad: use qwen.{name.rstrip('_')} (differentiable), or call it "
                "under torch.no_grad()"
            )
        return overload.redispatch(keyset & _BELOW_AUTOGRAD, *args, **kwargs)

    _AUTOGRAD_KERNELS.impl(name, guard, "Autograd", with_keyset=True)
