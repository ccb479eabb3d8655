"""Writing and opening exported models: TorchScript (.pt), ONNX (.onnx), OpenVINO IR (.xml + .bin).

Every export carries its metadata (`adtrain.json`: method, preprocessing, threshold, input
layout, largest batch) inside the file: a TorchScript extra file, ONNX metadata_props, OpenVINO
rt_info. `open_export` returns a runner: uint8 batch (numpy) -> dict of numpy outputs.
An export is a program (a graph of operators): open only exports you made or trust. Run
checkpoints are the format that runs no code when read.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from adtrain.errors import ConfigError, DataError
from adtrain.inference.graph import OUTPUTS
from adtrain.io import _atomic

log = logging.getLogger("adtrain")

FORMATS = {"torchscript": ".pt", "onnx": ".onnx", "openvino": ".xml"}
META_KEY = "adtrain.json"
INPUT_NAME = "images"
OPSET = 17
#: an ONNX graph with more tensor bytes than this stores them in a .data file beside it
LARGE_BYTES = 3 << 29


def _require(module: str, fmt: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError("format", f"{fmt} needs the '{module}' package: pip install 'adtrain[export]'") from None


def _trace_inputs(layout: str, batch: int, size: tuple[int, int]) -> torch.Tensor:
    shape = (batch, *size, 3) if layout == "nhwc" else (batch, 3, *size)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def write_torchscript(graph, example: torch.Tensor, meta: dict, path: Path) -> Path:
    import io

    with torch.no_grad():
        traced = torch.jit.trace(graph, example, check_trace=False)
    traced = torch.jit.freeze(traced.eval())
    data = io.BytesIO()  # torch's own file writer aborts the process on a full disk (a C++ terminate)
    torch.jit.save(traced, data, _extra_files={META_KEY: json.dumps(meta)})
    return _atomic(path, lambda tmp: Path(tmp).write_bytes(data.getbuffer()))


def _dynamic_axes(layout: str) -> dict:
    spatial = {1: "height", 2: "width"} if layout == "nhwc" else {2: "height", 3: "width"}
    axes = {INPUT_NAME: {0: "batch", **spatial}}
    axes.update({name: {0: "batch"} for name in OUTPUTS})
    return axes


def write_onnx(graph, example: torch.Tensor, meta: dict, path: Path) -> Path:
    """No constant folding: folded slices of a memory bank would store it twice. A graph over
    ONNX's 2 GB protobuf limit keeps its tensors in one PATH.data file beside it."""
    onnx = _require("onnx", "onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        traced = Path(tmp) / "model.onnx"  # torch writes its own external files beside it when large
        with torch.no_grad():
            torch.onnx.export(graph, (example,), str(traced), input_names=[INPUT_NAME], output_names=list(OUTPUTS),
                              dynamic_axes=_dynamic_axes(meta["layout"]), opset_version=OPSET, dynamo=False,
                              do_constant_folding=False)
        model = onnx.load(str(traced))
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > LARGE_BYTES
    return _atomic(path, lambda t: onnx.save(model, t, save_as_external_data=big, all_tensors_to_one_file=True,
                                             location=f"{path.name}.data"))


def write_openvino(graph, example: torch.Tensor, meta: dict, path: Path) -> Path:
    ov = _require("openvino", "openvino")
    onnx_tmp = path.with_name(f".{path.stem}.tmp.onnx")
    try:
        write_onnx(graph, example, meta, onnx_tmp)
        model = ov.convert_model(str(onnx_tmp))
    finally:
        onnx_tmp.unlink(missing_ok=True)
    model.set_rt_info(json.dumps(meta), META_KEY)
    # written under temporary names, then renamed: the .bin first, then the .xml that needs it (OpenVINO
    # reads the .bin beside the .xml by name), so a failed write leaves no export, nor a half of one
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        xml = Path(tmp) / "model.xml"
        try:
            ov.save_model(model, str(xml), compress_to_fp16=False)  # writes model.xml and model.bin
        except RuntimeError as err:  # OpenVINO's stream errors ("iostream error") on a full disk
            raise OSError(f"OpenVINO could not write the model ({' '.join(str(err).split())[:200]})") from None
        os.replace(xml.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(xml, path)
    return path


WRITERS = {"torchscript": write_torchscript, "onnx": write_onnx, "openvino": write_openvino}


def export_format(path: str | Path) -> str | None:
    """The export format of a file by its name and content, or None (a checkpoint, or not ours)."""
    path = Path(path)
    if zipfile.is_zipfile(path):  # first: a TorchScript export is one, whatever its name
        with zipfile.ZipFile(path) as z:
            if any(n.endswith(f"extra/{META_KEY}") for n in z.namelist()):
                return "torchscript"
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".xml":
        return "openvino"
    return None


def _outputs(values) -> dict[str, np.ndarray]:
    return {name: np.asarray(v) for name, v in zip(OUTPUTS, values)}


def open_export(path: str | Path, device: str = "cpu", threads: int | None = None
                ) -> tuple[dict, Callable[[np.ndarray], dict]]:
    """(metadata, run): run(uint8 batch as the export's layout) -> {score, map, decision, normalized_score}.
    threads: the CPU threads ONNX Runtime and OpenVINO use (None: their default, every core); a
    TorchScript export runs on torch's own thread setting."""
    path = Path(path)
    fmt = export_format(path) if path.is_file() else None
    if fmt is None:
        raise DataError(path, "not found, or not an adtrain export (.onnx, .xml, or a TorchScript .pt from adtrain-export)")
    try:
        if fmt == "torchscript":
            extra = {META_KEY: ""}
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
            meta = json.loads(extra[META_KEY])

            def run(batch: np.ndarray) -> dict:
                with torch.no_grad():
                    out = module(torch.from_numpy(batch).to(device))
                return _outputs(o.cpu().numpy() for o in out)
        elif fmt == "onnx":
            ort = _require("onnxruntime", "onnx")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") \
                else ["CPUExecutionProvider"]
            opts = ort.SessionOptions()
            if threads:
                opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
            session = ort.InferenceSession(str(path), opts, providers=providers)
            meta = json.loads(session.get_modelmeta().custom_metadata_map[META_KEY])

            def run(batch: np.ndarray) -> dict:
                return _outputs(session.run(list(OUTPUTS), {INPUT_NAME: batch}))
        else:
            ov = _require("openvino", "openvino")
            core = ov.Core()
            model = core.read_model(str(path))
            meta = json.loads(model.get_rt_info(META_KEY).astype(str))
            # OpenVINO's "GPU" plugin is for Intel GPUs, never a CUDA device: asked for "cuda"
            # (device=auto on an NVIDIA machine), an OpenVINO export runs on the CPU
            if device.startswith("cuda"):
                log.info("%s: OpenVINO runs on the CPU (its GPU plugin is for Intel GPUs, not CUDA)", path)
            # f32 throughout: OpenVINO otherwise runs bf16/f16 where the CPU or GPU has it
            compiled = core.compile_model(model, "CPU",
                                          {"INFERENCE_PRECISION_HINT": "f32",
                                           **({"INFERENCE_NUM_THREADS": int(threads)} if threads else {})})

            def run(batch: np.ndarray) -> dict:
                res = compiled(batch)
                return _outputs(res[compiled.output(i)] for i in range(len(OUTPUTS)))
    except (ConfigError, DataError):
        raise
    except Exception as err:  # noqa: BLE001 - a broken or foreign file: say so in one line
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        raise DataError(path, f"cannot open {fmt} export ({first})") from None
    return meta, run
