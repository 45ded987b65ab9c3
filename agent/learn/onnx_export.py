"""A saved model as an ONNX graph, so a hospital runtime can score it without fedsilo.

Why ONNX: a clinical system that wants the federation's model (a scoring service, a PACS
plug-in) runs onnxruntime or another ONNX engine; it should not have to import fedsilo, Numba
or our kernels. The export walks the layout (the same `agent.learn.stack` structure functions
the forward pass uses) and writes each layer as standard operators whose weights are views of
the one flat parameter vector, so there is nothing to re-train or re-derive.

Opset: the default domain at opset 13 and IR version 7 (what onnx 1.8, late 2020, wrote).
Every operator used here (Cast, Sub, Div, IsNaN, Where, Conv, Relu, MaxPool,
GlobalAveragePool, Flatten, Concat, Gemm, Sigmoid, Squeeze, Unsqueeze, Reshape, Equal,
GreaterOrEqual, Or, Identity, StringNormalizer) exists at opset 13 with every
attribute and the float32/float64 types this graph needs; later versions of them only add
element types (integers, bfloat16, float8, int4) or Cast's float8 `saturate`. onnxruntime has
run opset 13 since 1.6 (2020) and TensorRT 8 and OpenVINO read it, whereas the IR version and
opset of whatever `onnx` package is installed (helper.make_model's default) would shut out
runtimes a hospital is slow to update. Squeeze takes its axes as an input from opset 13 on,
which is the form written here.

Inputs and output. `to_onnx(clinical="raw")` (the default, what `fedsilo model export` writes)
takes the clinical row as a hospital system holds it, one input per plan feature, named as the
feature, in plan order:
- numeric feature: float32 [N, 1], the value in the feature's unit (the card says which), NaN
  where missing;
- categorical feature: string [N, 1], the level as written (trimmed), matched as training
  matches it: exactly, else ignoring case when that is unambiguous; "" and the missing tokens
  of `agent.ingest.tables.MISSING_TOKENS` (any case) mean missing.
The graph encodes them as `agent.ingest.tables` does (numeric value; one-hot over the declared
levels, all zeros where missing) into `features_encoded`, then standardises: (x - mean) / scale
in float64, like `apply_standardization` (a float32 mean of a column such as a calendar year
would shift its standardised value by ~1e-4), then NaN -> 0 (mean imputation; under the plan's
missing policy "drop" nothing is imputed and such a row's probability is NaN, as training
would have skipped it). A level the plan does not declare also gives NaN: the row cannot be
scored, and a NaN says so where a made-up number would not.
`clinical="encoded"` instead takes `features` float32 [N, n_columns], the row already encoded
(`SavedModel.columns` order, not standardised), for callers that encode themselves.
- `image` float32 [N, depth, size, size] (cnn_fused only): the series as the project's
  preprocessing yields it (HU rescale, window to 0..1, resampled grid), slices as channels
  (NCHW). The graph applies the federation's per-voxel standardisation (image_norm = [mean |
  scale]) in float32, as the site does.
- `probability` float32 [N]: P(outcome = 1), the same shape `models.predict_proba` returns.

The categorical lookup uses ai.onnx.ml LabelEncoder (ml opset 2, onnxruntime since 1.0) and
StringNormalizer (opset 10, locale "C", so the host needs no locale installed) for the
case-insensitive match; lower-casing stands in for the table reader's casefold, which differs
only for a few non-ASCII letters (German sharp s).
Padding, pooling and fusion order come from `agent.learn.stack.FORWARD`, which the forward
pass's kernels implement.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent import __version__
from agent.config import FeatureSpec, plan_from_dict
from agent.ingest.tables import MISSING_TOKENS, encoded_columns
from agent.learn import stack
from agent.learn.modelfile import SavedModel
from agent.learn.onnx_io import ENCODED, INPUT_FEATURES, INPUT_IMAGE, OUTPUT, RAW, row_feeds
from agent.learn.stack import FORWARD
from agent.ops.atomic import write_bytes_atomic

__all__ = ["ENCODED", "INPUT_FEATURES", "INPUT_IMAGE", "OUTPUT", "RAW", "row_feeds", "to_onnx",
           "save_onnx", "load_onnx", "model_card", "build_model_card"]

OPSET = 13
IR_VERSION = 7
BATCH = "N"  # the symbolic batch dimension
EXPORTABLE_KINDS = ("logistic", "mlp", "cnn_fused")  # the kinds built on agent.learn.stack
CARD_VERSION = "1"
ML_DOMAIN, ML_OPSET = "ai.onnx.ml", 2
_MISSING_CODE, _UNKNOWN_CODE = -2, -3  # what the level lookup gives besides a level's index




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
                    "unit": f.unit, "columns": list(range(pos, pos + width))})
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
        self._consts: dict[str, np.ndarray] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer; a name asked for again must hold the same value (shared constants)."""
        value = np.ascontiguousarray(value)
        if name in self._consts:
            if not np.array_equal(self._consts[name], value):
                raise ValueError(f"two different constants named {name!r}")
            return name
        self._consts[name] = value
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._count}",
                                           **attrs))
        return out


def _level_codes(g: _Graph, f: FeatureSpec) -> str:
    """string [N, 1] -> int64 [N]: the level's index, _MISSING_CODE or _UNKNOWN_CODE, decided
    in the order agent.ingest.tables decides: missing token, exact level, case-folded level."""
    flat = g.op("Reshape", [f.name, g.const("flat_shape", np.array([-1], np.int64))])
    lower = g.op("StringNormalizer", [flat], case_change_action="LOWER", is_case_sensitive=0,
                 locale="C")
    tokens = sorted(MISSING_TOKENS)
    counts: dict[str, int] = {}
    for level in f.levels:
        counts[level.lower()] = counts.get(level.lower(), 0) + 1
    folded = [(level.lower(), i) for i, level in enumerate(f.levels)
              if counts[level.lower()] == 1 and level.lower() not in MISSING_TOKENS]
    keys = tokens + [k for k, _ in folded]
    values = [_MISSING_CODE] * len(tokens) + [i for _, i in folded]
    by_fold = g.op("LabelEncoder", [lower], domain=ML_DOMAIN, keys_strings=keys,
                   values_int64s=values, default_int64=_UNKNOWN_CODE)
    exact = g.op("LabelEncoder", [flat], domain=ML_DOMAIN, keys_strings=list(f.levels),
                 values_int64s=list(range(len(f.levels))), default_int64=-1)
    zero = g.const("zero_i64", np.zeros((), np.int64))
    found = g.op("GreaterOrEqual", [exact, zero])
    is_token = g.op("Equal", [by_fold, g.const("missing_code", np.array(_MISSING_CODE))])
    code = g.op("Where", [found, exact, by_fold])
    return g.op("Where", [is_token, by_fold, code], out=f"{f.name}_code")


def _encoded_features(g: _Graph, features: Sequence[FeatureSpec], drop: bool
                      ) -> tuple[str, str | None]:
    """The raw per-feature inputs encoded like agent.ingest.tables, concatenated in column
    order; plus a bool [N] "cannot be scored" (unknown level; missing under "drop") or None."""
    parts, flags = [], []
    for f in features:
        if f.type != "categorical":
            parts.append(f.name)
            continue
        code = _level_codes(g, f)
        levels = g.const(f"{f.name}_levels", np.arange(len(f.levels), dtype=np.int64)[None, :])
        column = g.op("Unsqueeze", [code, g.const("axis_1", np.array([1], np.int64))])
        parts.append(g.op("Cast", [g.op("Equal", [column, levels])], to=TensorProto.FLOAT))
        flags.append(g.op("Equal", [code, g.const("unknown_code", np.array(_UNKNOWN_CODE))]))
        if drop:
            flags.append(g.op("Equal", [code, g.const("missing_code", np.array(_MISSING_CODE))]))
    encoded = g.op("Concat", parts, out="features_encoded", axis=1) if len(parts) > 1 \
        else g.op("Identity", parts, out="features_encoded")
    flag = flags[0] if flags else None
    for other in flags[1:]:
        flag = g.op("Or", [flag, other])
    return encoded, flag


def _standardized_features(g: _Graph, model: SavedModel, encoded: str, impute: bool) -> str:
    x = g.op("Cast", [encoded], to=TensorProto.DOUBLE)
    x = g.op("Sub", [x, g.const("feature_mean", np.asarray(model.mean, dtype=np.float64))])
    x = g.op("Div", [x, g.const("feature_scale", np.asarray(model.scale, dtype=np.float64))])
    if not impute:  # policy "drop": a missing value stays NaN, and so does the probability
        return g.op("Cast", [x], out="features_standardized", to=TensorProto.FLOAT)
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


def to_onnx(model: SavedModel, *, clinical: str = RAW, created: datetime | None = None,
            extra: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """The saved model as a checked ONNX model (opset OPSET) with its card in metadata_props;
    `clinical` picks the clinical interface (RAW per-feature inputs, or ENCODED `features`).

    Raises ValueError on a model whose parts disagree or whose kind has no export."""
    if clinical not in (RAW, ENCODED):
        raise ValueError(f"clinical must be {RAW!r} or {ENCODED!r}, got {clinical!r}")
    card = build_model_card(model, created, {"clinical_inputs": clinical, **(extra or {})})
    plan = plan_from_dict(model.plan, file="saved model plan")
    layout = model.layout
    views = layout.views(np.ascontiguousarray(model.params))
    g = _Graph()
    unscorable = None
    if clinical == RAW:
        names = [f.name for f in plan.features]
        if INPUT_IMAGE in names or OUTPUT in names:
            raise ValueError(f"a feature named {INPUT_IMAGE!r} or {OUTPUT!r} would clash with "
                             f"the graph's own input/output; export with clinical={ENCODED!r}")
        inputs = [helper.make_tensor_value_info(
            f.name, TensorProto.STRING if f.type == "categorical" else TensorProto.FLOAT,
            [BATCH, 1]) for f in plan.features]
        encoded, unscorable = _encoded_features(g, plan.features, plan.missing == "drop")
    else:
        inputs = [helper.make_tensor_value_info(INPUT_FEATURES, TensorProto.FLOAT,
                                                [BATCH, len(model.columns)])]
        encoded = INPUT_FEATURES
    a = _standardized_features(g, model, encoded, impute=plan.missing == "mean")
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
    a = g.op("Squeeze", [a, g.const("squeeze_axes", np.array([1], dtype=np.int64))],
             out=OUTPUT if unscorable is None else None)
    if unscorable is not None:
        g.op("Where", [unscorable, g.const("nan", np.array(np.nan, np.float32)), a], out=OUTPUT)
    graph = helper.make_graph(
        g.nodes, f"fedsilo_{layout.kind}", inputs,
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [BATCH])], g.inits,
        doc_string=f"fedsilo {layout.kind} model of federation {card['federation']}: "
                   f"P({card['target']} = 1). Research use only.")
    opsets = [helper.make_opsetid("", OPSET)]
    if clinical == RAW and any(f.type == "categorical" for f in plan.features):
        opsets.append(helper.make_opsetid(ML_DOMAIN, ML_OPSET))
    onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="fedsilo",
                                   producer_version=__version__, ir_version=IR_VERSION)
    helper.set_model_props(onnx_model, card)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def save_onnx(model: SavedModel, path: Path, *, clinical: str = RAW,
              created: datetime | None = None,
              extra: Mapping[str, str] | None = None) -> Path:
    """Export `model` and write it to `path` atomically (a reader never sees half a file)."""
    path = Path(path)
    onnx_model = to_onnx(model, clinical=clinical, created=created, extra=extra)
    write_bytes_atomic(path, onnx_model.SerializeToString())
    return path


def load_onnx(path: Path) -> onnx.ModelProto:
    """An exported model read back from disk and checked again (a damaged file fails here)."""
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model
