"""The Lightning side every method shares: held-out validation, thresholds, test metrics (the test
hooks in adtrain.methods.test_hooks).

A method subclasses AnomalyModule, sets `self.model` (a pure torch model whose eval forward
returns AnomalyOutput) and implements `training_step` + `configure_optimizers` (or the
memory-bank hooks). Selection, thresholds and normalisation use held-out normals only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from adtrain import distributed
from adtrain.errors import TrainingError
from adtrain.methods.calibration import normalize_with, per_image
from adtrain.methods.chunks import cpu_chunks
from adtrain.methods.output import AnomalyOutput, concat
from adtrain.methods.test_hooks import AnomalyTestHooks
from adtrain.methods.val_maps import coarse_maps


#: validation pixel scores held and counted exactly in one sort per pass, up to this many (2,048
#: coarse maps of 64 x 64); a larger validation set streams the rest (metrics/pixel.py)
VAL_EXACT_PIXELS = 1 << 23
#: test pixel scores held and counted exactly, up to this many (the config's ``metrics.exact_pixels``):
#: an MVTec AD or VisA category's test set at 256 x 256 (at most about 13 M pixels) fits
TEST_EXACT_PIXELS = 1 << 24


def decides_pixels(module) -> bool:
    """``AnomalyModule.pixel_decisions`` of a module or of an export's MethodScorer (which holds the
    same buffers but not the property)."""
    return bool(torch.isfinite(module.pixel_threshold)) and len(getattr(module, "task_memories", ())) <= 1


class AnomalyModule(AnomalyTestHooks, LightningModule):
    #: memory-bank / training-free methods set this: one pass over the data, no optimiser
    training_free: bool = False

    def __init__(self) -> None:
        super().__init__()
        # Fitted on held-out normals after selection; saved with the checkpoint.
        self.register_buffer("threshold", torch.tensor(float("nan")))
        self.register_buffer("score_center", torch.tensor(0.0))
        self.register_buffer("map_center", torch.tensor(0.0))
        #: a pixel's decision threshold: the same quantile of the held-out normals' map maxima
        self.register_buffer("pixel_threshold", torch.tensor(float("nan")))
        self.adtrain_config: dict | None = None
        self.evaluator = None
        self.test_records: list[dict] = []
        self.heatmap_dir: Path | None = None
        self.heatmap_paths: set[str] = set()
        self.heatmap_files: list[str] = []
        self.test_outputs = None  # methods.test_outputs.TestOutputs during a test epoch
        self._writer = None  # adtrain.writer.BackgroundWriter while heatmaps are queued
        self.heatmap_numbers: dict[str, int] = {}  # path -> its number in the heatmap names (test order)
        self.sample_index: list[int] = []  # the dataset index of each test record / validation item (DDP)
        self.pixel_metrics = True
        self._val_scores: list[torch.Tensor] = []
        self._val_evaluator = None
        self._val_defects: list[str] = []
        self._val_map_means: list[float] = []  # each validation item's mean map value (dataset order)
        self.last_val_metrics: dict[str, float] = {}
        #: the image scores and kinds ("good" or "synthetic_<family>") of the last validation
        self.last_val_items: dict[str, list] = {"scores": [], "defects": []}

    # ----------------------------------------------------------------- inputs
    #: what normalises uint8 image batches on the device (adtrain.data.device_norm.DeviceNormalize);
    #: None: the trainer's data module's ``input_normalizer``, else ImageNet's statistics
    input_norm = None

    def input_normalizer(self):
        if self.input_norm is not None:
            return self.input_norm
        try:
            norm = getattr(self._trainer.datamodule, "input_normalizer", None) if self._trainer is not None else None
        except (AttributeError, RuntimeError):
            norm = None
        if norm is None:
            from adtrain.data.device_norm import device_normalizer

            norm = device_normalizer()
        return norm

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the model takes them: on its device (a non-blocking copy, from pinned memory
        where the loader pins) and, when the loader handed over uint8 (``data.device_normalize``),
        normalised there, bit-identical to the workers' float path."""
        images = images.to(self.device, non_blocking=True)
        return self.input_normalizer()(images) if images.dtype == torch.uint8 else images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Every batch of the trainer's loops (fit, validate, test, predict), once on the device: a
        uint8 image is normalised there, once per batch; a float one is left as it is."""
        from adtrain.data.device_norm import normalize_batch

        image = batch.get("image") if isinstance(batch, dict) else batch
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            return normalize_batch(batch, self.input_normalizer())
        return batch

    # ----------------------------------------------------------------- inference
    def anomaly_output(self, images: torch.Tensor) -> AnomalyOutput:
        """Scores for a batch of normalised images (uint8 ones are normalised first: `model_input`);
        the model must be in eval mode."""
        if images.dtype == torch.uint8:
            images = self.model_input(images)
        parts = cpu_chunks(images, getattr(self, "cpu_chunk_pixels", 0))  # 0: export's MethodScorer
        if len(parts) <= 1:
            out = self.model(images)
            return AnomalyOutput(out.anomaly_map.float(), out.pred_score.float())
        return concat([self.model(images[p]) for p in parts])

    #: CPU inference without gradients runs the model on at most this many input pixels per call
    #: (4 images of 256 x 256); 0 = whole batches. Large activations (over glibc's 32 MiB mmap
    #: limit) are mapped fresh and page-faulted on every call; smaller ones come from the heap
    #: and stay in cache (docs/BENCHMARKS.md: STFPM about 2x faster per image at batch 32).
    #: Set from the config's ``inference.cpu_chunk_pixels``.
    cpu_chunk_pixels: int = 1 << 18
    #: test pixel scores counted exactly, up to this many; past it they stream through the adaptive
    #: bins (metrics/pixel.py). Set from the config's ``metrics.exact_pixels``.
    test_exact_pixels: int = TEST_EXACT_PIXELS
    #: AUPRO's integration limit on the false-positive rate (validation and test). Set from the
    #: config's ``metrics.aupro_fpr_limit``: 0.3 as for MVTec AD; MVTec AD 2 reports AU-PRO at 0.05.
    aupro_fpr_limit: float = 0.3
    #: where the test's pixel metrics are taken: "run" (the model's maps against masks resized like
    #: the images, as the papers do) or "source" (each map brought back to its image's own size,
    #: against the ground-truth files as they are: adtrain.metrics.source_resolution). Set from the
    #: config's ``metrics.resolution``.
    pixel_resolution: str = "run"
    #: (image_size, center_crop) of the test's eval transform, for "source" (set by adtrain.engine)
    source_geometry: tuple | None = None

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        return self.anomaly_output(images)

    @property
    def pixel_decisions(self) -> bool:
        """Does ``pixel_threshold`` decide this model's pixels? Fitted, and one model for every image
        (a continual run's memories of several tasks route each image to its task's calibration)."""
        return decides_pixels(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint from before pixel thresholds were kept (2026-12-06): none fitted
        state_dict.setdefault(prefix + "pixel_threshold", torch.tensor(float("nan")))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def inference_outputs(self, out: AnomalyOutput) -> dict[str, torch.Tensor]:
        """What a prediction returns, from the model's raw output: ``score`` (B,) raw image score,
        ``normalized_score`` (B,) (0 at the normal median, 0.5 at the threshold), ``map`` (B,H,W)
        display-normalised to [0, 1] (0.5 = ``display_threshold()``, the pixel threshold where it
        decides; per-image min-max when no threshold is fitted) and ``decision`` (B,) bool, score >
        threshold; ``threshold`` (B,) each image's (a routed model's: its task's); ``raw_map``
        (B,H,W) the model's own map and (one task's model) ``pixel_threshold`` (B,), for benchmark
        servers' files (adtrain.inference.map_files). Exports trace this very code (and output the
        first four)."""
        score = out.pred_score.float()
        amap = out.anomaly_map[:, 0].float()
        routed = per_image(self, score.shape[0], score.device)  # continual per-task memories
        if routed is not None:
            thr, s_center, m_center = routed
            return {"score": score, "normalized_score": normalize_with(score, s_center, thr),
                    "map": normalize_with(amap, m_center, thr).clamp(0, 1), "decision": score > thr,
                    "threshold": thr.float(), "raw_map": amap}
        if torch.isfinite(self.threshold):
            norm_map = self.normalize(amap, self.map_center, self.display_threshold()).clamp(0, 1)
        else:
            low = amap.flatten(1).amin(dim=1).view(-1, 1, 1)
            norm_map = (amap - low) / (amap.flatten(1).amax(dim=1).view(-1, 1, 1) - low).clamp_min(1e-12)
        return {"score": score, "normalized_score": self.normalize(score, self.score_center),
                "map": norm_map, "decision": score > self.threshold,
                "threshold": self.threshold.float().expand(score.shape[0]), "raw_map": amap,
                "pixel_threshold": self.pixel_threshold.float().expand(score.shape[0])}

    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> dict[str, Any]:
        """``trainer.predict``: a batch of normalised images (a tensor, or a dict with ``image`` and
        optionally ``path``) -> `inference_outputs` on the CPU (plus ``path`` when given)."""
        images = batch["image"] if isinstance(batch, dict) else batch
        with torch.no_grad():
            res = {k: v.cpu() for k, v in self.inference_outputs(self.anomaly_output(images)).items()}
        if isinstance(batch, dict) and "path" in batch:
            res["path"] = list(batch["path"])
        return res

    # ----------------------------------------------------------------- helpers
    def check_finite(self, loss: torch.Tensor, name: str = "loss") -> None:
        if not torch.isfinite(loss).all():
            raise TrainingError(
                f"{name} became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}. "
                "Lower the learning rate (method.lr), use trainer.precision=32-true, or check the "
                "data for constant/empty images. The last good checkpoint is in <run dir>/checkpoints/."
            )

    # ----------------------------------------------------------------- validation
    #: can the untrained start detect anomalies (a host's matching, a memory of untrained features)?
    #: then it is validated before training and kept when no trained state validates better
    start_is_detector: bool = False
    #: logged each validation epoch (validation set: held-out normals + synthetic anomalies)
    VAL_KEYS = ("val/image_auroc", "val/pixel_auroc", "val/pixel_aupro", "val/normal_score", "val/normal_map_mean")

    #: validate every N training epochs and after the last one (set by run.py from the config)
    val_every_n_epochs: int = 1
    #: log the validation figures to the trainer's logger (off for a continual run's routed
    #: validation, which would mix other tasks' figures into the training curves)
    log_validation: bool = True

    def validating_now(self) -> bool:
        """False on the epochs of a fit that are not validated (their batches are passed over)."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
            return True
        epoch, last = int(trainer.current_epoch), trainer.max_epochs
        return (epoch + 1) % max(1, int(self.val_every_n_epochs)) == 0 or (last is not None and epoch + 1 >= last)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        from adtrain.metrics import AnomalyEvaluator

        if not self.validating_now():
            return
        if self._val_evaluator is None:
            self._val_evaluator = distributed.wrap_evaluator(
                lambda: AnomalyEvaluator(pixel_metrics=True, exact_pixels=VAL_EXACT_PIXELS,
                                         aupro_fpr_limit=self.aupro_fpr_limit))
        distributed.note_batch(self, self._val_evaluator, batch)
        out = self.validation_output(batch["image"])
        labels = batch["label"].to(out.pred_score.device)
        amap, mask = coarse_maps(out.anomaly_map, batch["mask"].to(out.anomaly_map.device))
        self._val_evaluator.update(out.pred_score, labels, amap, mask, batch["has_mask"])
        self._val_scores.append(out.pred_score.detach().float()[labels == 0].cpu())
        self._val_defects += [d if int(l) == 1 else "good" for d, l in zip(batch["defect"], labels.tolist())]
        self._val_map_means += amap.flatten(1).float().mean(dim=1).tolist()

    def validation_output(self, images: torch.Tensor) -> AnomalyOutput:
        """``anomaly_output`` for a validation batch; a method may give its maps already at
        ``coarse_size`` of the image (all the validation's pixel metrics read) to skip the rest."""
        return self.anomaly_output(images)

    def validation_metrics(self) -> dict[str, float]:
        """The epoch's validation figures (a key is absent when undefined, e.g. no anomalies)."""
        out = {}
        if self._val_scores and torch.cat(self._val_scores).numel():
            out["val/normal_score"] = float(torch.cat(self._val_scores).mean())
        normal = [m for m, d in zip(self._val_map_means, self._val_defects) if d == "good"]
        if normal and len(self._val_map_means) == len(self._val_defects):
            # STFPM's official selection figure: the mean of every held-out normal's map (equal-size
            # maps: the mean of their per-image means). Area-averaged coarse maps keep the mean
            out["val/normal_map_mean"] = float(sum(normal) / len(normal))
        if self._val_evaluator is not None:
            res = self._val_evaluator.compute()
            for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
                if res.get(key) is not None:
                    out[f"val/{key}"] = float(res[key])
            out.update(self._family_auroc(self._val_evaluator))
        return out

    def _family_auroc(self, evaluator) -> dict[str, float]:
        """Image AUROC of the held-out normals against each synthetic family alone
        (``val/image_auroc_cutpaste``, ``val/image_auroc_perlin``): a method trained on one family
        is selected on another (docs/methods/dfm.md)."""
        from adtrain.metrics.image import image_metrics

        scores, defects = evaluator.image_scores, self._val_defects
        if len(scores) != len(defects):
            return {}
        out = {}
        for family in sorted({d for d in defects if d.startswith("synthetic_")}):
            keep = [i for i, d in enumerate(defects) if d in ("good", family)]
            auroc = image_metrics([scores[i] for i in keep], [int(defects[i] != "good") for i in keep])["image_auroc"]
            if auroc is not None:
                out[f"val/image_auroc_{family.removeprefix('synthetic_')}"] = float(auroc)
        return out

    def on_validation_epoch_end(self) -> None:
        if self.validating_now():
            distributed.sync_validation(self)  # DDP: every rank's items, each once, in dataset order
        self.last_val_metrics = self.validation_metrics() if self.validating_now() else {}
        ev = self._val_evaluator
        if self.validating_now() and ev is not None and len(ev.image_scores) == len(self._val_defects):
            self.last_val_items = {"scores": [float(v) for v in ev.image_scores], "defects": list(self._val_defects)}
        # float64: a Python float logged as is became a float32 tensor, so the CSV and W&B held 0.48500001
        # beside results.json's 0.485 (MPS has no float64: float32 there)
        wide = torch.float32 if self.device.type == "mps" else torch.float64
        for key, value in (self.last_val_metrics if self.log_validation else {}).items():
            self.log(key, torch.tensor(float(value), dtype=wide, device=self.device),
                     prog_bar=key in ("val/image_auroc", "val/normal_score"),
                     sync_dist=distributed.world_size() > 1)  # equal on every rank already: quiets Lightning
        self._val_scores = []
        self._val_defects = []
        self._val_map_means = []
        self._val_evaluator = None
        self.sample_index = []

    # ----------------------------------------------------------------- thresholds
    @torch.no_grad()
    def fit_threshold(self, dataloader, quantile: float = 0.99, max_pixels: int = 2_000_000,
                      f1_dataloader=None) -> dict:
        """Image threshold and display normalisation from held-out normal images; the pixel
        threshold (decision masks: adtrain.inference.map_files) is the same quantile of their maps'
        maxima, on the maps' own scale (an image score need not be a map's maximum). f1_dataloader
        (threshold.mode=val_f1): the image threshold is instead the largest F1's on that validation
        set (adtrain.methods.val_threshold); the centres and the pixel threshold stay as above."""
        self.eval()
        scores, pixels, peaks = [], [], []
        per_batch = max(1, max_pixels // max(1, len(dataloader)))
        for batch in dataloader:
            out = self.anomaly_output(self.model_input(batch["image"]))
            scores.append(out.pred_score.cpu())
            flat = out.anomaly_map.flatten().cpu()
            pixels.append(flat[:: max(1, flat.numel() // per_batch)])
            peaks.append(out.anomaly_map.flatten(1).amax(dim=1).cpu())
        if not scores:
            return {"threshold": None}
        s = torch.cat(scores).double()
        self.normal_scores = s  # the held-out normals' image scores (continual DFM's per-task calibration)
        self.threshold.fill_(float(torch.quantile(s, quantile)))
        # the median (torch's .median() is the lower of the two middle values of an even count)
        self.score_center.fill_(float(torch.quantile(s, 0.5)))
        self.map_center.fill_(float(torch.quantile(torch.cat(pixels).double(), 0.5)))
        self.pixel_threshold.fill_(float(torch.quantile(torch.cat(peaks).double(), quantile)))
        info = {"threshold": float(self.threshold), "threshold_mode": "quantile", "threshold_quantile": quantile,
                "normal_score_median": float(self.score_center), "pixel_threshold": float(self.pixel_threshold),
                "num_threshold_images": int(s.numel())}
        if f1_dataloader is not None:
            from adtrain.methods.val_threshold import val_f1_threshold

            f1 = val_f1_threshold(self, f1_dataloader)
            if f1["threshold"] is not None:
                self.threshold.fill_(f1["threshold"])
                info.update(f1, threshold_mode="val_f1", quantile_threshold=info["threshold"])
                self._centre_below_threshold(info)
        return info

    def _centre_below_threshold(self, info: dict) -> None:
        """A validation-F1 threshold at or below the held-out normals' median score: a normalised score
        (0 at the centre, 0.5 at the threshold) needs a centre below the threshold, else it was the raw
        score, unsaid. The centre moves to the threshold less the normals' spread (the quantile
        threshold's distance above their median); results.json's score_center says where."""
        thr, centre = float(self.threshold), float(self.score_center)
        if thr > centre:
            return
        spread = info["quantile_threshold"] - centre
        moved = thr - (spread if spread > 0 else max(abs(thr), 1e-6))
        self.score_center.fill_(moved)
        info["score_center"] = float(self.score_center)
        import logging

        logging.getLogger("adtrain").warning(
            "the validation set's F1 threshold %.4g is at or below the held-out normals' median score %.4g: "
            "normalised scores take 0 at %.4g instead (0.5 stays the threshold)", thr, centre, info["score_center"])

    def display_threshold(self) -> torch.Tensor:
        """The map level a display map puts at 0.5: the pixel threshold where it decides this model's
        pixels (``pixel_decisions``: the level of the decision masks, on the maps' own scale), else the
        image threshold (a routed model's, or one fitted before the pixel threshold existed). An image
        score need not be its map's maximum (PatchCore reweights it, DFM's is taken before the
        upsampling and blur), so the image threshold put map pixels of the masks' level below 0.5."""
        return self.pixel_threshold if decides_pixels(self) else self.threshold

    def map_threshold(self) -> float | None:
        """The pixel threshold where the display maps put it at 0.5 (``display_threshold``), None where
        they put the image threshold there: what a heatmap's colour bar names."""
        return float(self.pixel_threshold) if decides_pixels(self) else None

    def normalize(self, values: torch.Tensor, center: torch.Tensor, threshold: torch.Tensor | None = None) -> torch.Tensor:
        """0 at the normal median, 0.5 at the threshold (the image threshold, or ``threshold``: a map's
        is ``display_threshold()``) (linear); no threshold -> raw values."""
        thr = self.threshold if threshold is None else threshold
        if not torch.isfinite(thr) or float(thr - center) <= 0:
            return values
        return 0.5 * (values - center) / (thr - center)

    # ----------------------------------------------------------------- continual learning
    #: what the method does across tasks (docs/continual.md); "finetune" = naive sequential
    continual_behaviour: str = "finetune"

    @property
    def decides_per_task(self) -> bool:
        """A routed image is decided with its task's own threshold (per-task memories, calibrated DFM):
        the continual runner then leaves the last task's threshold alone (schedule.threshold)."""
        return False

    def begin_task(self, task_id: int, categories: list[str]) -> None:
        """Called by the continual runner before training on task `task_id`."""

    def end_task(self, task_id: int, categories: list[str]) -> None:
        """Called after task `task_id` is trained and selected (before it is evaluated)."""

    # ----------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["adtrain_config"] = self.adtrain_config
