"""`fedsilo model export` and `fedsilo model verify`: the model files a hospital hands on.

Export turns the coordinator's model directory (model.json + model.f32) into the ONNX file
that sites score with and any hospital runtime can load; verify (agent.learn.distribution)
checks a received model's signature and digest before anyone uses it.
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import ConfigError, DataError

WHERE = "fedsilo model export"


def run_export(model_dir: Path, out: Path | None = None, *, encoded: bool = False) -> int:
    """Write <model_dir>/model.onnx (or `out`), print what the card says."""
    from agent.learn import onnx_export as ox
    from agent.learn.modelfile import load_model

    model_dir = Path(model_dir)
    if not (model_dir / "model.json").is_file():
        raise ConfigError(WHERE, "--model", f"{model_dir}: no model.json (the coordinator "
                                            f"writes its model to <state_dir>/model/)")
    try:
        saved = load_model(model_dir)
    except DataError as exc:
        raise ConfigError(WHERE, "--model", str(exc)) from None
    out = Path(out) if out is not None else model_dir / "model.onnx"
    try:
        ox.save_onnx(saved, out, clinical=ox.ENCODED if encoded else ox.RAW)
    except ValueError as exc:
        raise ConfigError(WHERE, "--model", f"{model_dir}: {exc}") from None
    except OSError as exc:
        raise ConfigError(WHERE, "--out", f"{out}: cannot be written "
                                          f"({exc.strerror or exc})") from None
    card = ox.model_card(ox.load_onnx(out))
    print(f"wrote {out} ({out.stat().st_size} bytes): {card['model_kind']} of federation "
          f"{card['federation']}, opset {card['opset']}, {card['clinical_inputs']} clinical "
          f"inputs, parameters {card['params_sha256'][:12]}; research use only")
    return 0
