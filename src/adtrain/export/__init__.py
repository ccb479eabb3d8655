"""Export a finished run's model as one graph: TorchScript, ONNX or OpenVINO.

    adtrain-export checkpoint=RUN/checkpoints/model.ckpt [format=onnx|torchscript|openvino]
        [out=FILE] [layout=nhwc|nchw] [batch=2]

layout: the input's axis order, images (B,H,W,3) as image files decode (nhwc) or (B,3,H,W) (nchw);
batch: the batch size the graph is traced at (any batch runs).

The graph takes a uint8 image batch (any size: it resizes to the run's image_size by the run's
data.resize rule) and holds the run's preprocessing, the method's anomaly map and image score,
the fitted threshold and the display normalisation; it returns score (B,), map (B,h,w) in [0,1]
(0.5 = threshold), decision (B,) bool and normalized_score (B,). Memory banks are constants searched by a chunked exact
nearest neighbour (adtrain.memory.graph_knn): no FAISS, memory bounded whatever the bank size.
Output: RUN/export/model.{pt,onnx,xml} by default. docs/EXPORT.md has the details.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path


from adtrain.errors import ConfigError
from adtrain.export.formats import FORMATS, WRITERS, _trace_inputs
from adtrain.inference.graph import LAYOUTS, InferenceGraph, check_exportable, run_preprocessing

log = logging.getLogger("adtrain")


def default_export_path(checkpoint: str | Path, fmt: str) -> Path:
    """RUN/export/model.<ext>; a continual run's task checkpoint (RUN/tasks/<t>/model.ckpt):
    RUN/tasks/<t>/export/model.<ext>, so that two tasks' exports never replace each other."""
    from adtrain.predict import default_out_dir

    ckpt = Path(checkpoint).resolve()
    if ckpt.parent.name.isdigit() and ckpt.parent.parent.name == "tasks":
        return ckpt.parent / "export" / f"model{FORMATS[fmt]}"
    return default_out_dir(checkpoint).parent / "export" / f"model{FORMATS[fmt]}"


def max_batch(method) -> int | None:
    """The largest batch one call of the export may take (None: any). Every method's graph takes
    any batch now: HETMM's traced matching holds the whole batch in one image chunk (methods.hetmm.atmm);
    its exports before that recorded method.chunk_size, which Detector still honours."""
    return None


def export(checkpoint: str | Path, format: str = "onnx", out: str | Path | None = None, layout: str = "nhwc",
           batch: int = 2) -> Path:
    """Write the export of a finished run's checkpoint; returns its path."""
    from adtrain.loading import load_method

    if format not in FORMATS:
        raise ConfigError("format", f"must be one of {', '.join(FORMATS)}, got {format!r}")
    if layout not in LAYOUTS:
        raise ConfigError("layout", f"must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError("batch", f"must be a whole number >= 1, got {batch!r}")
    others = {ext for f, ext in FORMATS.items() if f != format}  # a .pt may be named as the user likes, not as these
    if out and ((format != "torchscript" and Path(out).suffix != FORMATS[format]) or Path(out).suffix in others):
        raise ConfigError("out", f"a {format} export is a {FORMATS[format]} file, got {out}")
    method, cfg, _ = load_method(checkpoint)  # a missing or unreadable checkpoint first: nothing is made for it
    check_exportable(method, checkpoint)  # nor for one that cannot be exported
    path = Path(out) if out else default_export_path(checkpoint, format)
    _check_out(path, format, "out" if out else "checkpoint")
    pre, _ = run_preprocessing(cfg)
    graph = InferenceGraph(method.cpu(), pre, layout).eval()
    limit = max_batch(method)
    meta = {
        "format": format, "method": str(cfg.method.get("name", type(method).__name__)), "layout": layout,
        "preprocessing": pre.to_dict(), "threshold": float(method.threshold),
        "score_center": float(method.score_center), "map_center": float(method.map_center),
        # the level its display maps put at 0.5 (the pixel threshold where it decides, else null: the image threshold)
        "map_threshold": method.map_threshold(),
        "max_batch": limit, "checkpoint": str(checkpoint), "adtrain_version": _version(),
    }
    example = _trace_inputs(layout, min(batch, limit or batch), pre.image_size)
    with warnings.catch_warnings():  # the tracer's notes on shapes fixed at export (sizes, bank length)
        warnings.simplefilter("ignore")
        try:
            WRITERS[format](graph, example, meta, path)
        except OSError as err:  # a full disk, a folder removed meanwhile: one line, no file left
            raise ConfigError("out" if out else "checkpoint",
                              f"cannot write the export {path}: {err.strerror or err}") from None
    log.info("exported %s (%s) to %s", meta["method"], format, path)
    return path


def _check_out(path: Path, format: str, key: str) -> None:
    """The export's file can be written (a folder made, not a folder itself): said before the model is
    traced, naming ``out`` (or the checkpoint whose run folder holds the default path)."""
    from adtrain.io import writable_folder

    if path.is_dir():
        raise ConfigError(key, f"{path} is a folder: give a file, e.g. out={path / ('model' + FORMATS[format])}")
    writable_folder(path.parent, key, "the export's folder")


#: adtrain-export's options (key=value) and their defaults
DEFAULTS = {"checkpoint": None, "format": "onnx", "out": None, "layout": "nhwc", "batch": 2}


def _version() -> str:
    from adtrain import __version__

    return __version__


def main(argv: list[str] | None = None) -> None:
    from adtrain.cli import command, options

    def body(argv: list[str]) -> None:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        args = options(argv, DEFAULTS, text=("checkpoint", "out", "format", "layout"))
        if not args["checkpoint"]:
            raise ConfigError("checkpoint", "required, e.g. checkpoint=RUN/checkpoints/model.ckpt format=onnx")
        print(export(**args))

    command("adtrain-export", __doc__, body, argv)


__all__ = ["export", "main", "FORMATS"]
