"""The model-kind registry: what a plan's `[model] kind` names, in one entry per kind.

An entry says everything the rest of fedsilo needs to know about a kind: whether it reads
images, what a plan must give it, the tensors it is made of (its Layout), how a layout that
arrives from the wire is checked, how its parameters start, and its forward/backward pass.
Plan parsing, `build_layout`, `Layout.from_dict`, `init_params`, the trainer, the site, the
coordinator and `fedsilo predict` all ask the registry, so a new model is one entry, not edits in
five modules: a `register_kind` call here, or a consortium's own package that names its
ModelKind under the `fedsilo.model_kinds` entry-point group (every fedsilo command loads those;
see docs/models.md).

Nothing here imports the layout or config modules at run time (they import this one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import ConfigError
from agent.learn import stack

if TYPE_CHECKING:
    from agent.config.plan import ImagingSpec, ModelSpec
    from agent.learn.layout import Layout

Named = list[tuple[str, tuple[int, ...]]]
ImageShape = tuple[int, int, int]


@dataclass(frozen=True)
class ModelKind:
    """One model kind. Functions take the Layout (already packed and bounds-checked)."""

    name: str
    summary: str  # what it is, in one line (logged when a plugin brings it)
    reads_images: bool
    # (plan key, problem) for the first thing in [model]/[imaging] this kind cannot use, or None
    plan_problem: Callable[[ModelSpec, ImagingSpec | None], tuple[str, str] | None]
    # named tensor shapes for a spec reading n_inputs clinical features (and an image)
    tensors: Callable[[ModelSpec, int, ImageShape | None], Named]
    check_layout: Callable[[Layout], None]  # raise ValueError if tensors are not this kind's
    n_inputs: Callable[[Layout], int]  # width of the clinical feature vector read
    init: Callable[[Layout, np.random.Generator, np.ndarray], None]  # fill zeroed params
    loss_and_grad: Callable[..., tuple[float, np.ndarray]]  # (layout, p, x, y, kernels, images)
    predict_proba: Callable[..., np.ndarray]  # (layout, p, x, kernels, images)
    # extra JSON fields of the layout's wire form (beyond version, kind, tensors, image_shape),
    # derived from the tensors: written by to_dict, and must agree with them on parse
    wire_keys: tuple[str, ...] = ()
    wire_fields: Callable[[Layout], dict[str, Any]] = field(default=lambda _layout: {})


_REGISTRY: dict[str, ModelKind] = {}


def register_kind(kind: ModelKind) -> ModelKind:
    """Make `kind` selectable by name in plans and accepted in layouts from the wire."""
    if kind.name in _REGISTRY:
        raise ValueError(f"model kind {kind.name!r} is registered already")
    _REGISTRY[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind (tests that register their own)."""
    _REGISTRY.pop(name, None)


def kind_names() -> tuple[str, ...]:
    """Registered kind names in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def model_kind(name: str) -> ModelKind:
    """The entry for `name`; ValueError naming the registered kinds otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model kind {name!r} (expected one of "
                         f"{', '.join(kind_names())})") from None


PLUGIN_GROUP = "fedsilo.model_kinds"


def load_plugins() -> tuple[str, ...]:
    """Register the kinds that installed packages declare under PLUGIN_GROUP; their names.

    A plugin is code the hospital installed, trusted like fedsilo itself; one that fails to
    load, is not a ModelKind of its entry's name, or would replace another kind is a
    ConfigError naming it (exit 2), not a half-working site.
    """
    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        where = f"entry point {ep.name} = {ep.value} ({PLUGIN_GROUP})"
        try:
            kind = ep.load()
        except Exception as exc:  # noqa: BLE001 - any import error is the plugin's, said as such
            raise ConfigError(where, "", f"cannot be loaded: {type(exc).__name__}: {exc}"
                              ) from None
        if not isinstance(kind, ModelKind) or kind.name != ep.name:
            raise ConfigError(where, "", f"must be a ModelKind named {ep.name!r}, got "
                                         f"{type(kind).__name__} {getattr(kind, 'name', '')!r}")
        if _REGISTRY.get(kind.name) is kind:
            continue
        if kind.name in _REGISTRY:
            raise ConfigError(where, "", f"model kind {kind.name!r} is registered already")
        register_kind(kind)
        loaded.append(kind.name)
    return tuple(loaded)


# ------------------------------------------------------------------ the built-in kinds

def _no_conv(kind: str, model: ModelSpec, image_shape: ImageShape | None) -> None:
    if image_shape is not None or model.conv_channels:
        raise ValueError(f"a {kind} model reads no image: no image_shape or conv_channels")


CONV_CHANNELS_PROBLEM = ("model.conv_channels",
                         "a cnn_fused model needs conv_channels; other kinds have none")


def _table_plan_problem(model: ModelSpec) -> tuple[str, str] | None:
    return CONV_CHANNELS_PROBLEM if model.conv_channels else None


def _names(layout: Layout) -> list[str]:
    return [t.name for t in layout.tensors]


def _logistic_plan(model: ModelSpec, imaging: ImagingSpec | None) -> tuple[str, str] | None:
    if model.hidden:
        return "model.hidden", "a logistic model has no hidden layers"
    return _table_plan_problem(model)


def _logistic_tensors(model: ModelSpec, n: int, image_shape: ImageShape | None) -> Named:
    _no_conv("logistic", model, image_shape)
    if model.hidden:
        raise ValueError("a logistic model has no hidden layers")
    return [("w", (n, 1)), ("b", (1,))]


def _logistic_check(layout: Layout) -> None:
    if layout.tensors[0].name != "w":
        raise ValueError(f"a logistic layout holds tensors w, b; got {_names(layout)}")
    stack.check_dense_chain(layout)


def _mlp_plan(model: ModelSpec, imaging: ImagingSpec | None) -> tuple[str, str] | None:
    if not model.hidden:
        return "model.hidden", "an mlp needs at least one hidden layer width"
    return _table_plan_problem(model)


def _mlp_tensors(model: ModelSpec, n: int, image_shape: ImageShape | None) -> Named:
    _no_conv("mlp", model, image_shape)
    if not model.hidden:
        raise ValueError("an mlp needs at least one hidden layer")
    return stack.dense_named([n, *model.hidden, 1])


def _mlp_check(layout: Layout) -> None:
    if layout.tensors[0].name == "w" or stack.conv_layers(layout):
        raise ValueError(f"an mlp layout holds dense0.w, dense0.b, ... only; got "
                         f"{_names(layout)}")
    stack.check_dense_chain(layout, min_layers=2)


def _cnn_plan(model: ModelSpec, imaging: ImagingSpec | None) -> tuple[str, str] | None:
    if not model.conv_channels:
        return CONV_CHANNELS_PROBLEM
    if imaging is None:
        return "imaging", "a cnn_fused model needs an [imaging] table"
    factor = 2 ** len(model.conv_channels)
    if imaging.size % factor:
        return "imaging.size", f"must be divisible by {factor} (one 2x2 pooling per conv layer)"
    return None


def _cnn_tensors(model: ModelSpec, n: int, image_shape: ImageShape | None) -> Named:
    if image_shape is None or not model.conv_channels:
        raise ValueError("a cnn_fused model needs image_shape and conv_channels")
    return (stack.conv_named([image_shape[0], *model.conv_channels], model.kernel_size)
            + stack.dense_named([model.conv_channels[-1] + n, *model.hidden, 1]))


def _cnn_check(layout: Layout) -> None:
    stack.check_dense_chain(layout)  # names first: the conv checks below index by name
    stack.check_conv_stack(layout)


def _stack_kind(name: str, summary: str, reads_images: bool,
                plan_problem: Callable[[ModelSpec, ImagingSpec | None], tuple[str, str] | None],
                tensors: Callable[[ModelSpec, int, ImageShape | None], Named],
                check_layout: Callable[[Layout], None]) -> ModelKind:
    wire = ((lambda layout: {"kernel_size": stack.kernel_size(layout)}) if reads_images
            else (lambda _layout: {}))
    return ModelKind(name=name, summary=summary, reads_images=reads_images,
                     plan_problem=plan_problem, tensors=tensors, check_layout=check_layout,
                     n_inputs=stack.n_inputs, init=stack.init_stack,
                     loss_and_grad=stack.loss_and_grad, predict_proba=stack.predict_proba,
                     wire_keys=("kernel_size",) if reads_images else (), wire_fields=wire)


register_kind(_stack_kind("logistic", "logistic regression on the clinical features", False,
                          _logistic_plan, _logistic_tensors, _logistic_check))
register_kind(_stack_kind("mlp", "dense layers (`hidden` widths, ReLU) on the clinical features",
                          False, _mlp_plan, _mlp_tensors, _mlp_check))
register_kind(_stack_kind("cnn_fused", "conv layers on the series image fused with the clinical "
                          "features, then `hidden` dense layers", True,
                          _cnn_plan, _cnn_tensors, _cnn_check))

