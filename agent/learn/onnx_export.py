"""A saved model as an ONNX graph, so a hospital runtime can score it without fedsilo.

Why ONNX: a clinical system that wants the federation's model (a scoring service, a PACS
plug-in) runs onnxruntime or another ONNX engine; it should not have to import fedsilo, Numba
or our kernels. The export walks the layout (the same `agent.learn.stack` structure functions
the forward pass uses) and writes each layer as standard operators whose weights are views of
the one flat parameter vector, so there is nothing to re-train or re-derive.

Opset: the default domain at opset 13 and IR version 7 (what onnx 1.8, late 2020, wrote).
Every operator used here (Cast, Sub, Div, IsNaN, Where, Conv, Relu, MaxPool,
GlobalAveragePool, Flatten, Concat, Gemm, Sigmoid, Squeeze) exists at opset 13 with every
attribute and the float32/float64 types this graph needs; later versions of them only add
element types (integers, bfloat16, float8, int4) or Cast's float8 `saturate`. onnxruntime has
run opset 13 since 1.6 (2020) and TensorRT 8 and OpenVINO read it, whereas the IR version and
opset of whatever `onnx` package is installed (helper.make_model's default) would shut out
runtimes a hospital is slow to update. Squeeze takes its axes as an input from opset 13 on,
which is the form written here.

Inputs and output (names in INPUT_FEATURES, INPUT_IMAGE, OUTPUT):
- `features` float32 [N, n_columns]: the clinical row encoded as `agent.ingest.tables` encodes
  it (numeric features as their value, NaN where missing under policy "mean"; categorical ones
  one-hot over the declared levels in declared order, all zeros where missing), columns in
  `SavedModel.columns` order, NOT standardised. The graph standardises: (x - mean) / scale in
  float64, like `apply_standardization` (a float32 mean of a column such as a calendar year
  would shift its standardised value by ~1e-4), then NaN -> 0 (mean imputation).
- `image` float32 [N, depth, size, size] (cnn_fused only): the series as the project's
  preprocessing yields it (HU rescale, window to 0..1, resampled grid), slices as channels
  (NCHW). The graph applies the federation's per-voxel standardisation (image_norm = [mean |
  scale]) in float32, as the site does.
- `probability` float32 [N]: P(outcome = 1), the same shape `models.predict_proba` returns.

Left for later pieces: encoding strings (a categorical value to its one-hot columns, missing
tokens) inside the graph; the `fedsilo model export` command; scoring imaging models from the
CLI. The card lists every feature's name, type, levels and input columns; units are not in
the plan, so the card cannot state them.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent import __version__
from agent.config import FeatureSpec, plan_from_dict
from agent.ingest.tables import encoded_columns
from agent.learn import stack
from agent.learn.modelfile import SavedModel
from agent.ops.atomic import write_bytes_atomic

OPSET = 13
IR_VERSION = 7
INPUT_FEATURES = "features"
INPUT_IMAGE = "image"
OUTPUT = "probability"
BATCH = "N"  # the symbolic batch dimension
EXPORTABLE_KINDS = ("logistic", "mlp", "cnn_fused")  # the kinds built on agent.learn.stack
CARD_VERSION = "1"


@dataclass(frozen=True)
class ForwardConvention:
    """What the stack's forward pass does that its tensor shapes do not say.

    `agent.learn.stack` and the kernels (`kernels.ref_conv`) fix these in code, not in named
    constants, so they are written down once here for the export and pinned against the forward
    pass by tests/test_onnx_export.py (kernel sizes 3 and 5, ties, fusion order)."""

    padding: str = "same"  # stride 1, k odd, k // 2 zeros on every side (symmetric)
    pool: int = 2  # max-pool window and stride after each conv's ReLU; no padding
    # Ties in a pooling window: the reference picks the first cell row-major, which only
    # routes the gradient; the forward value (the max) is the same whichever cell wins.
    pool_ties: str = "first cell in row-major order (forward value unaffected)"
    image_layout: str = "NCHW: [N, depth, h, w], the slices are the conv input channels"
    fusion: str = "globally average-pooled image features first, then the clinical columns"
    feature_order: str = "SavedModel.columns (agent.ingest.tables.encoded_columns order)"
    dense: str = "x @ w + b with w [in, out]; ReLU after every layer but the last"

    def pad(self, kernel: int) -> int:
        """Zeros added on each side so a stride-1 conv keeps the image size."""
        if self.padding != "same" or kernel % 2 == 0:
            raise ValueError(f"only 'same' padding with an odd kernel is defined, got {kernel}")
        return kernel // 2


FORWARD = ForwardConvention()


# ------------------------------------------------------------------ checks and the card

def _check_model(model: SavedModel) -> None:
    """Everything the graph bakes in must agree, or the export would be a different model."""
    layout = model.layout
    if layout.kind not in EXPORTABLE_KINDS or layout.model_kind.predict_proba \
            is not stack.predict_proba:
        raise ValueError(f"no ONNX export for model kind {layout.kind!r} (exportable: "
                         f"{', '.join(EXPORTABLE_KINDS)})")
    p = model.params
    if not isinstance(p, np.ndarray) or p.dtype != np.float32 or p.shape != (layout.size,):
        raise ValueError(f"params must be float32 of shape ({layout.size},), got "
                         f"{getattr(p, 'dtype', None)} {getattr(p, 'shape', None)}")
    d = len(model.columns)
    if layout.n_inputs != d:
        raise ValueError(f"the layout reads {layout.n_inputs} clinical columns, the model "
                         f"names {d}")
    for name, a in (("mean", model.mean), ("scale", model.scale)):
        if np.shape(a) != (d,) or not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be {d} finite values")
    if not np.all(np.asarray(model.scale) > 0):
        raise ValueError("scale must be positive")
    if layout.image_shape is None:
        if model.image_norm is not None and np.size(model.image_norm):
            raise ValueError(f"a {layout.kind} model reads no image, but has an image_norm")
        return
    voxels = math.prod(layout.image_shape)
    norm = model.image_norm
    if norm is None or np.shape(norm) != (2 * voxels,) or not np.all(np.isfinite(norm)) \
            or not np.all(norm[voxels:] > 0):
        raise ValueError(f"a {layout.kind} model needs image_norm: {voxels} means then "
                         f"{voxels} positive scales")


def _features_doc(plan_features: Sequence[FeatureSpec]) -> list[dict[str, Any]]:
    """name, type, levels and the input columns each feature fills, in input order."""
    out, pos = [], 0
    for f in plan_features:
        width = len(f.levels) if f.type == "categorical" else 1
        out.append({"name": f.name, "type": f.type, "levels": list(f.levels),
                    "columns": list(range(pos, pos + width))})
        pos += width
    return out


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def build_model_card(model: SavedModel, created: datetime | None = None,
                     extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The card the export writes into metadata_props: provenance a reader can check (plan,
    layout and parameter digests), what the inputs mean, and that it is for research only.

    `rounds` is the plan's round count: a SavedModel does not record a federation that stopped
    early (e.g. on its privacy budget), so a caller that knows better passes it in `extra`
    under another key. JSON-valued entries: features, columns, privacy, imaging, inputs."""
    from agent.federation.coordinator import plan_digest  # the digest checkpoints name

    _check_model(model)
    plan = plan_from_dict(model.plan, file="saved model plan")
    if tuple(model.columns) != encoded_columns(plan.features):
        raise ValueError("the model's columns are not the ones its plan's features encode to")
    created = created or datetime.now(timezone.utc)
    if created.tzinfo is None:
        raise ValueError("created must be timezone-aware (the card says UTC)")
    layout = model.layout
    card = {
        "card_version": CARD_VERSION,
        "producer": f"fedsilo {__version__}",
        "research_use_only": "true",
        "federation": plan.federation,
        "rounds": str(plan.rounds),
        "plan_sha256": plan_digest(plan),
        "strategy": plan.strategy.name,
        "model_kind": layout.kind,
        "layout_sha256": layout.digest(),
        "params_sha256": hashlib.sha256(model.params.astype("<f4").tobytes()).hexdigest(),
        "target": plan.target,
        "missing": plan.missing,
        "features": _json(_features_doc(plan.features)),
        "columns": _json(list(model.columns)),
        "created_utc": created.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "opset": str(OPSET),
        "inputs": _json({INPUT_FEATURES: "float32 [N, n_columns], encoded, not standardised",
                         **({INPUT_IMAGE: "float32 [N, depth, size, size], windowed 0..1"}
                            if layout.image_shape else {})}),
        "output": f"{OUTPUT}: float32 [N], P({plan.target} = 1)",
    }
    if "privacy" in model.plan:
        card["privacy"] = _json(plan.privacy.to_dict())
    if plan.imaging is not None:
        img = plan.imaging
        card["imaging"] = _json({"modality": img.modality, "depth": img.depth, "size": img.size,
                                 "window_center": img.window_center,
                                 "window_width": img.window_width})
    for key, value in (extra or {}).items():
        if key in card or not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"extra card entry {key!r} must be a new string key with a string "
                             f"value")
        card[key] = value
    return card


def model_card(onnx_model: onnx.ModelProto) -> dict[str, str]:
    """The card read back from an exported model's metadata_props (string keys and values)."""
    return {p.key: p.value for p in onnx_model.metadata_props}


# ------------------------------------------------------------------ the graph

class _Graph:
    """Nodes and initializers with generated names, in the order they are added."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._count}",
                                           **attrs))
        return out


def _standardized_features(g: _Graph, model: SavedModel) -> str:
    x = g.op("Cast", [INPUT_FEATURES], to=TensorProto.DOUBLE)
    x = g.op("Sub", [x, g.const("feature_mean", np.asarray(model.mean, dtype=np.float64))])
    x = g.op("Div", [x, g.const("feature_scale", np.asarray(model.scale, dtype=np.float64))])
    x = g.op("Cast", [x], to=TensorProto.FLOAT)
    missing = g.op("IsNaN", [x])
    return g.op("Where", [missing, g.const("zero", np.zeros((), np.float32)), x],
                out="features_standardized")


def _image_features(g: _Graph, model: SavedModel, views: dict[str, np.ndarray]) -> str:
    layout = model.layout
    assert layout.image_shape is not None and model.image_norm is not None
    mean, scale = np.split(np.asarray(model.image_norm, dtype=np.float32), 2)
    a = g.op("Sub", [INPUT_IMAGE, g.const("image_mean", mean.reshape(layout.image_shape))])
    a = g.op("Div", [a, g.const("image_scale", scale.reshape(layout.image_shape))],
             out="image_standardized")
    k = stack.kernel_size(layout)
    assert k is not None
    p = FORWARD.pad(k)
    for w, b in stack.conv_layers(layout):
        a = g.op("Conv", [a, g.const(w, views[w]), g.const(b, views[b])], kernel_shape=[k, k],
                 pads=[p, p, p, p], strides=[1, 1], dilations=[1, 1], group=1)
        a = g.op("Relu", [a])
        a = g.op("MaxPool", [a], kernel_shape=[FORWARD.pool] * 2, strides=[FORWARD.pool] * 2,
                 pads=[0, 0, 0, 0])
    a = g.op("GlobalAveragePool", [a])
    return g.op("Flatten", [a], out="image_features", axis=1)


def to_onnx(model: SavedModel, *, created: datetime | None = None,
            extra: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The saved model as a checked ONNX model (opset OPSET) with its card in metadata_props.

    Raises ValueError on a model whose parts disagree or whose kind has no export."""
    card = build_model_card(model, created, extra)  # checks the model first
    layout = model.layout
    views = layout.views(np.ascontiguousarray(model.params))
    g = _Graph()
    a = _standardized_features(g, model)
    inputs = [helper.make_tensor_value_info(INPUT_FEATURES, TensorProto.FLOAT,
                                            [BATCH, len(model.columns)])]
    if layout.image_shape is not None:
        inputs.append(helper.make_tensor_value_info(INPUT_IMAGE, TensorProto.FLOAT,
                                                    [BATCH, *layout.image_shape]))
        a = g.op("Concat", [_image_features(g, model, views), a], axis=1)
    layers = stack.dense_layers(layout)
    for i, (w, b) in enumerate(layers):
        a = g.op("Gemm", [a, g.const(w, views[w]), g.const(b, views[b])], alpha=1.0, beta=1.0,
                 transA=0, transB=0)
        if i < len(layers) - 1:
            a = g.op("Relu", [a])
    a = g.op("Sigmoid", [a])
    g.op("Squeeze", [a, g.const("squeeze_axes", np.array([1], dtype=np.int64))], out=OUTPUT)
    graph = helper.make_graph(
        g.nodes, f"fedsilo_{layout.kind}", inputs,
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH])], g.inits,
        doc_string=f"fedsilo {layout.kind} model of federation {card['federation']}: "
                   f"P({card['target']} = 1). Research use only.")
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                   producer_name="fedsilo", producer_version=__version__,
                                   ir_version=IR_VERSION)
    helper.set_model_props(onnx_model, card)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def save_onnx(model: SavedModel, path: Path, *, created: datetime | None = None,
              extra: Mapping[str, str] | None = None) -> Path:
    """Export `model` and write it to `path` atomically (a reader never sees half a file)."""
    path = Path(path)
    write_bytes_atomic(path, to_onnx(model, created=created, extra=extra).SerializeToString())
    return path


def load_onnx(path: Path) -> onnx.ModelProto:
    """An exported model read back from disk and checked again (a damaged file fails here)."""
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model
