r"""Score new images with a trained run: heatmaps and a CSV of scores and decisions.

    python -m adtrain.predict checkpoint=RUN/checkpoints/model.ckpt images='DIR_OR_GLOB' [out=DIR]
        [batch_size=16] [device=auto|cpu|cuda] [num_workers=0] [heatmaps=true] [heatmap_size=320]
        [anomaly_maps=false] [relative_to=DIR] [on_error=stop|skip]

num_workers: processes that read and resize the images while the model scores (0: in this one).

checkpoint: a finished run's model.ckpt or an export of it (adtrain-export: .onnx, .pt, .xml); both
go through `adtrain.Detector`. The decision threshold is the one fitted during training (on held-out
normals, or on the validation set with threshold.mode=val_f1): a checkpoint without one (a training checkpoint such as last.ckpt) is refused. Output goes to RUN/predictions by
default (RUN: the run the checkpoint belongs to), replaces the heatmaps and CSV of an earlier call
there, and heatmaps are named after each image's folder and file (good__000.png, crack__000.png). They
are drawn as the run's own test heatmaps are: input | map over it with a colour bar (the threshold at
its middle) at the image's aspect ratio, heatmap_size pixels high, titled with the score and decision;
drawn in a background thread while the next batch is scored, about 0.15 s per image on this
project's 2-core CPU (docs/BENCHMARKS.md, "predict's heatmaps"): heatmaps=false for scores and decisions alone.

An image that cannot be read (cut short, not an image) stops the call with an error naming it, and
the output of an earlier call is left as it was (on_error=stop, the default). on_error=skip scores
the rest instead: each unreadable image gets a row in predictions.csv with its reason in the
`error` column (blank for the images scored) and no score, and the call ends with a warning
counting them (an error when no image at all could be read).

anomaly_maps=true also writes each image's raw anomaly map at the image's own size (float16 TIFF)
and its decision mask ({0, 255} PNG; the pixel threshold, fitted on held-out normal maps, in
results.json), in the layout of MVTec AD 2's
evaluation server (adtrain.inference.map_files), named after the image's path below relative_to:

    python -m adtrain.predict checkpoint=RUN_CAN/checkpoints/model.ckpt \
        images='ROOT/can/test_private*/*.png' relative_to=ROOT out=submission anomaly_maps=true heatmaps=false

fills submission/anomaly_images/can/test_private/000_regular.tiff, ... (one call per category: the
maps of earlier calls stay). It needs a checkpoint: exports output display maps only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from adtrain.data.file_checks import SMALL_OUTLIER, STRETCH_WARNING
from adtrain.data.image_files import expand_image_paths
from adtrain.errors import ConfigError, DataError
from adtrain.io import move_files
from adtrain.inference.map_files import MAP_FOLDERS

log = logging.getLogger("adtrain")
DEFAULTS = {"checkpoint": None, "images": None, "out": None, "batch_size": 16, "device": "auto", "heatmaps": True,
            "num_workers": 0, "anomaly_maps": False, "relative_to": None, "heatmap_size": 320, "on_error": "stop"}
ON_ERROR = ("stop", "skip")


def list_images(spec: str) -> list[str]:
    """A folder's images as training lists them (adtrain.data.image_files.expand_image_paths: below
    it, linked folders followed, hidden files skipped), a file, or a glob's image files; a name that is
    not UTF-8 is refused there, before any image is scored (the CSV could not hold it)."""
    files = [str(f) for f in expand_image_paths(spec)]
    if not files:  # an empty folder
        raise DataError(spec, "no images found (give a folder, a file or a glob such as 'dir/*.png')")
    return files


def _without_own_outputs(files: list[str], out_dir: Path, spec: str) -> list[str]:
    """The images less those an earlier call wrote into out_dir (its heatmaps/ and map folders): an
    out= inside the images' folder (images=lot out=lot/results) scored them as new images."""
    own = [(out_dir / name).resolve() for name in ("heatmaps", *MAP_FOLDERS)]
    kept = [f for f in files if not any(Path(f).resolve().is_relative_to(folder) for folder in own)]
    if len(kept) < len(files):
        log.info("%d files of %s are this command's own outputs in %s: not scored", len(files) - len(kept), spec,
                 out_dir)
    if not kept:
        raise DataError(spec, f"holds no images but this command's outputs in {out_dir}")
    return kept


def _out_of_shape(w: int, h: int, image_size) -> bool:
    """An image the model's input (H, W) blows up 4x or more along a side (a thumbnail, a 1x1 file), or
    stretches STRETCH_WARNING times out of its shape (as a training run warns about its own images)."""
    in_h, in_w = (int(v) for v in image_size)
    if w <= 0 or h <= 0:
        return True
    stretch = max((w / h) / (in_w / in_h), (in_w / in_h) / (w / h))
    return w * SMALL_OUTLIER <= in_w or h * SMALL_OUTLIER <= in_h or stretch >= STRETCH_WARNING


def default_out_dir(checkpoint: str | Path) -> Path:
    """RUN/predictions for a checkpoint inside a run directory (the nearest folder above it with a
    config.yaml or results.json), else a predictions/ folder beside the checkpoint."""
    ckpt = Path(checkpoint).resolve()
    for folder in list(ckpt.parents)[:4]:
        if (folder / "config.yaml").exists() or (folder / "results.json").exists():
            return folder / "predictions"
    return ckpt.parent / "predictions"


def heatmap_names(files: list[str]) -> list[str]:
    """A file name per image from its path below the images' common folder ('crack/000.png' ->
    'crack__000.png'): images of different folders never collide (a name already given, even in
    another case, takes a counter: _2, _3, ...)."""
    where = [Path(os.path.abspath(f)) for f in files]  # not resolve(): a linked file keeps its own name
    parents = [str(p.parent) for p in where]
    common = Path(os.path.commonpath(parents)) if parents else Path(".")
    base = common.parent if len(set(parents)) == 1 else common  # one folder: keep its name
    names = ["__".join(p.relative_to(base).with_suffix("").parts) for p in where]
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    out = [f"{n}_{Path(f).suffix.lstrip('.')}.png" if seen[n] > 1 else f"{n}.png" for n, f in zip(names, files)]
    taken: set[str] = set()  # 'a/b__c.png' and 'a__b/c.png' join alike; a case-blind disk: 'A.png', 'a.png'
    for i, name in enumerate(out):
        k = 2
        while out[i].lower() in taken:
            out[i] = f"{name[:-4]}_{k}.png"
            k += 1
        taken.add(out[i].lower())
    return out


def _check_args(batch_size, device: str) -> torch.device:
    from adtrain.inference.detector import resolve_device

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", f"must be a whole number >= 1, got {batch_size!r}")
    return resolve_device(device)


def _clear_earlier(out_dir: Path) -> None:
    """Files of an earlier call into out_dir (the heatmaps its predictions.csv lists, and the CSV), so none
    is taken for this one's. Nothing else is touched: a file predict did not write is not predict's to delete."""
    import csv

    earlier = out_dir / "predictions.csv"
    if not earlier.is_file():
        return
    try:
        with open(earlier, newline="") as f:
            listed = [row.get("heatmap") for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        log.warning("%s: unreadable (%s): the heatmaps it lists are left in place", earlier, err)
        listed = []
    folder = (out_dir / "heatmaps").resolve()
    for name in listed:
        png = (out_dir / name).resolve() if name else None
        if png is not None and png.parent == folder and png.suffix == ".png":
            png.unlink(missing_ok=True)
    earlier.unlink(missing_ok=True)


def _check_out(out_dir: Path) -> None:
    """out= must not be a run directory: its heatmaps/ are the test's (predict's default is RUN/predictions)."""
    from adtrain.rundir import is_run_dir

    if is_run_dir(out_dir):
        raise ConfigError("out", f"{out_dir} is a run directory (its heatmaps/ hold the test's heatmaps): choose "
                          "another folder, or leave out= for RUN/predictions")


def _publish(staging: Path, out_dir: Path) -> None:
    """This call's heatmaps, made in ``staging``, replace an earlier call's, and its map files join
    out_dir's (only once every image is scored: a call that fails leaves the earlier output as it was).
    Its predictions.csv, which lists the heatmaps, moves in before them (a manifest first): whatever an
    interrupted move left is listed, so the next call clears it. Two calls publishing into one out_dir
    at once take turns (a lock on the folder itself): interleaved, one's predictions.csv could list the
    other's heatmaps of the same names."""
    import fcntl

    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, or the process ends
        _clear_earlier(out_dir)
        if (staging / "predictions.csv").is_file():
            os.replace(staging / "predictions.csv", out_dir / "predictions.csv")
        if (staging / "heatmaps").is_dir():  # none asked (heatmaps=false): no empty folder either
            (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
        for png in sorted((staging / "heatmaps").glob("*.png")):
            os.replace(png, out_dir / "heatmaps" / png.name)
        for folder in MAP_FOLDERS:  # map files (anomaly_maps=true): added, earlier calls' other images kept
            move_files(staging, out_dir, [f.relative_to(staging) for f in sorted((staging / folder).rglob("*"))
                                          if f.is_file()])
    finally:
        os.close(fd)


def predict(checkpoint: str, images: str, out: str | None = None, batch_size: int = 16, device: str = "auto",
            heatmaps: bool = True, num_workers: int = 0, anomaly_maps: bool = False,
            relative_to: str | None = None, heatmap_size: int = 320, on_error: str = "stop") -> Path:
    from adtrain.inference.detector import Detector
    from adtrain.inference.map_files import relative_names, to_source_size, write_map_files
    from adtrain.data.file_checks import header_size
    from adtrain.engine import write_scores_csv
    from adtrain.viz import save_heatmap, shown_size
    from adtrain.writer import BackgroundWriter

    _check_args(batch_size, device)
    if on_error not in ON_ERROR:
        raise ConfigError("on_error", f"{on_error!r} is not one of {', '.join(ON_ERROR)}")
    if heatmaps and (isinstance(heatmap_size, bool) or not isinstance(heatmap_size, int) or heatmap_size < 32):
        raise ConfigError("heatmap_size", f"must be a whole number of pixels >= 32, got {heatmap_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError("num_workers", f"must be a whole number >= 0, got {num_workers!r}")
    for key, value in (("heatmaps", heatmaps), ("anomaly_maps", anomaly_maps)):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
    files = list_images(images)
    detector = Detector.load(checkpoint, device=device, batch_size=batch_size)
    if not np.isfinite(detector.threshold):
        from adtrain.inference.graph import NO_THRESHOLD

        raise DataError(checkpoint, NO_THRESHOLD)
    if anomaly_maps:
        import tifffile  # noqa: F401  (a missing dependency fails here, before any image is scored)

        if detector.kind != "checkpoint":
            raise ConfigError("anomaly_maps", f"needs a run's checkpoint (model.ckpt): {checkpoint} is an export, "
                              "which outputs display maps only")
        if not detector.method.pixel_decisions:
            raise DataError(checkpoint, "holds no pixel threshold for decision masks (a continual run routes each "
                            "image to its task's, or the run was fitted before 2026-12-06): use a one-task run "
                            "fitted with this version")
    out_dir = Path(out) if out else default_out_dir(checkpoint)
    _check_out(out_dir)
    files = _without_own_outputs(files, out_dir, images)
    map_names = dict(zip(files, relative_names(files, relative_to))) if anomaly_maps else {}
    made = not out_dir.exists()  # removed again if this call fails (empty: its work folder is removed too)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file of that name, or a folder that cannot be made
        raise ConfigError("out", f"cannot make the folder {out_dir}: {err.strerror or err}") from None
    names = dict(zip(files, heatmap_names(files)))
    thr = detector.threshold
    records, skipped, odd = [], [], []
    try:  # a read-only folder (a model store): one line, before any image is scored
        staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
    except OSError as err:
        if made:
            shutil.rmtree(out_dir, ignore_errors=True)
        key = "out" if out else "checkpoint"
        raise ConfigError(key, f"the output folder {out_dir} is not writable ({err.strerror or err})"
                          + ("" if out else "; give out=<a writable folder>")) from None
    writer = BackgroundWriter() if heatmaps else None  # drawn in a thread while the next batch is scored
    try:
        batches = detector.predict_batches(files, batch_size, num_workers=num_workers,
                                           skip_unreadable=on_error == "skip")
        for pred in tqdm(batches, desc="predict", unit="batch", total=-(-len(files) // batch_size)):
            for path, error in pred.skipped:
                log.warning("%s: %s (skipped: on_error=skip)", path, error)
                skipped.append(path)
                records.append({"path": path, "heatmap": None, "score": None, "normalized_score": None,
                                "threshold": None, "is_anomalous": None, "error": error})
            for i, path in enumerate(pred.names):
                score = float(pred.scores[i])
                image_thr = thr if pred.thresholds is None else float(pred.thresholds[i])  # a routed image: its task's
                records.append({
                    "path": path, "heatmap": f"heatmaps/{names[path]}" if heatmaps else None, "score": score,
                    "normalized_score": float(pred.normalized_scores[i]), "threshold": image_thr,
                    "is_anomalous": int(pred.decisions[i]), "error": None,
                })
                w, h = header_size(path)  # the file's own size, read from its header once
                if _out_of_shape(w, h, detector.pre.image_size):
                    odd.append((path, w, h))
                if heatmaps:  # as the run's test heatmaps: colour bar, threshold, the image's aspect ratio
                    writer.submit(staging / "heatmaps" / names[path], save_heatmap, image=pred.inputs[i],
                                  norm_map=pred.maps[i], mask=None, score=score, label=None, truth=False,
                                  height=int(heatmap_size), threshold=image_thr,
                                  source_size=shown_size((h, w), detector.pre.image_size, detector.pre.center_crop),
                                  map_threshold=detector.map_threshold if pred.thresholds is None else None)
                if anomaly_maps:
                    write_map_files(staging, map_names[path], to_source_size(pred.raw_maps[i], detector.pre, (h, w)),
                                    float(pred.pixel_thresholds[i]))
        if writer is not None:
            writer.close()  # every heatmap written (a failed one raises here, naming its file)
        if skipped and len(skipped) == len(files):
            raise DataError(images, f"no image could be read ({len(files)} given; first: {skipped[0]}: "
                            f"{records[0]['error']})")
        order = {f: i for i, f in enumerate(files)}  # listing order (a batch's unreadable files came first)
        records.sort(key=lambda r: order[r["path"]])
        write_scores_csv(staging / "predictions.csv", records)
        _publish(staging, out_dir)
        made = False
    except BaseException as e:
        if records and len(skipped) < len(files):
            log.error("stopped after %d of %d images; %s is left as it was", len(records), len(files), out_dir)
        if isinstance(e, DataError) and on_error == "stop":
            log.error("on_error=skip scores the other images and lists the unreadable ones in predictions.csv")
        raise
    finally:
        if writer is not None:
            writer.stop()
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
    if odd:
        path, w, h = odd[0]
        in_h, in_w = detector.pre.image_size
        log.warning("%d of %d images are far from the model's input %dx%d (4x or more smaller along a side, or "
                    "stretched %.1fx or more; first: %s, %dx%d): they are scored from little or distorted detail",
                    len(odd), len(files), in_w, in_h, STRETCH_WARNING, path, w, h)
    if skipped:
        log.warning("%d of %d images could not be read and were skipped (their reasons: the error column of %s)",
                    len(skipped), len(files), out_dir / "predictions.csv")
    log.info("%d images scored; %s", len(records) - len(skipped), out_dir / "predictions.csv")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    from adtrain.cli import command, options

    def body(argv: list[str]) -> None:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        args = options(argv, DEFAULTS, text=("checkpoint", "images", "out", "relative_to", "device", "on_error"))
        for key in ("checkpoint", "images"):
            if not args[key]:
                raise ConfigError(key, "required, e.g. checkpoint=RUN/checkpoints/model.ckpt images='DIR_OR_GLOB'")
        from adtrain.runstate import catch_sigterm

        # SIGTERM (timeout, SLURM) as Ctrl-C: the work folder in out= removed, the earlier outputs kept, status 143
        put_back = catch_sigterm(Path(args["out"] or default_out_dir(args["checkpoint"])))
        try:
            predict(**args)
        finally:
            put_back()

    command("adtrain.predict", __doc__, body, argv)


if __name__ == "__main__":
    main()
