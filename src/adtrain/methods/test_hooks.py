"""The test side every method shares (a mixin of AnomalyModule, adtrain.methods.base).

The test path has no per-image Python on the hot path: scores stay batched on the device
(TestOutputs), pixel statistics are updated per batch, and only the sampled heatmaps leave
the device, drawn and written by a background thread. At epoch end `finish_test` turns the
accumulated outputs into the image metrics and the per-image records in one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adtrain import distributed
from adtrain.methods.calibration import normalize_with, per_image
from adtrain.methods.output import AnomalyOutput


class AnomalyTestHooks:
    """Lightning's test hooks for AnomalyModule: it sets the attributes they read (threshold,
    score_center, map_center, pixel_threshold, evaluator, heatmap_dir, test_exact_pixels, ...)."""

    def on_test_epoch_start(self) -> None:
        from adtrain.methods.test_outputs import TestOutputs
        from adtrain.metrics import AnomalyEvaluator

        exact = int(self.test_exact_pixels)
        self.evaluator = distributed.wrap_evaluator(
            lambda: AnomalyEvaluator(pixel_metrics=self.pixel_metrics, exact_pixels=exact,
                                     aupro_fpr_limit=self.aupro_fpr_limit,
                                     pixel_groups=self.pixel_by_category,  # 0: off
                                     spro_groups=self.spro_groups,  # {}: off
                                     pixel_threshold=float(self.pixel_threshold) if self.pixel_decisions else None))
        self.test_outputs = TestOutputs()
        self.test_records = []
        self.heatmap_files = []
        self.sample_index = []
        self._close_writer()
        self._writer = None

    def on_test_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        distributed.note_batch(self, self.evaluator, batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        out = self.anomaly_output(batch["image"])
        if "source_mask" in batch:  # metrics.resolution=source: each group of equal source sizes at its size
            self._source_pixels(out.anomaly_map, batch)
        else:
            spro = (batch["spro_code"], batch["spro_fraction"], batch["category"], batch["defect"]) \
                if self.spro_groups and "spro_code" in batch else None
            self.evaluator.update_pixels(out.anomaly_map, batch["label"], batch["mask"], batch["has_mask"],
                                         batch["category"] if self.pixel_by_category else None, spro)
        routed = per_image(self, out.pred_score.shape[0], out.pred_score.device)
        self.test_outputs.add(batch, out.pred_score, None if routed is None else routed[:2])
        if self.heatmap_dir is not None and self.heatmap_paths:
            for i, path in enumerate(batch["path"]):
                if path in self.heatmap_paths:
                    self._queue_heatmap(batch, out, i)

    def _source_pixels(self, anomaly_map: torch.Tensor, batch: dict) -> None:
        """The batch's pixel statistics at its images' own sizes (``pixel_resolution`` "source")."""
        from adtrain.metrics.source_resolution import update_at_source

        if self.evaluator.pixel_metrics:
            update_at_source(self.evaluator, anomaly_map, batch, self.source_geometry, bool(self.pixel_by_category),
                             bool(self.spro_groups) and "source_spro_code" in batch)

    def on_test_epoch_end(self) -> None:
        self._close_writer()  # this process's heatmaps are written
        distributed.sync_test(self)  # DDP: every test image once, in dataset order, on every rank
        self.finish_test(self.test_outputs)

    def finish_test(self, outputs) -> None:
        """The epoch's accumulated (or gathered) TestOutputs -> image metrics + test_records;
        every queued heatmap is written (errors raised here, naming the file) before it returns."""
        from adtrain.methods.test_outputs import build_records

        self._close_writer()
        t = outputs.tensors()
        self.evaluator.update(t["score"], t["label"])
        self.test_records = build_records(t["score"], t["label"], outputs.meta,
                                          lambda s: self.normalize(s, self.score_center.to(s.device)),
                                          float(self.threshold), t.get("calibration"))

    def _close_writer(self) -> None:
        writer, self._writer = getattr(self, "_writer", None), None
        if writer is not None:
            writer.close()

    #: heatmap panel height in pixels (output.heatmap_size; set by adtrain.engine)
    heatmap_size: int = 320
    #: how many categories to keep pixel metrics of too (a test set of several; 0: none; set by adtrain.engine)
    pixel_by_category: int = 0
    #: {category: defect types} to compute AU-sPRO for (MVTec LOCO AD; {}: none; set by adtrain.engine)
    spro_groups: dict = {}

    def _queue_heatmap(self, batch: dict, out: AnomalyOutput, i: int) -> None:
        """Host copies of image i's inputs to the heatmap, drawn and written by the background writer."""
        from adtrain.viz import denormalize, save_heatmap, shown_size
        from adtrain.writer import BackgroundWriter

        threshold, map_threshold = self.threshold, None
        routed = per_image(self, out.pred_score.shape[0], out.anomaly_map.device)
        if routed is not None:  # the image's task's threshold and map centre
            threshold = routed[0][i]
            norm_map = normalize_with(out.anomaly_map[i, 0][None], routed[2][i:i + 1], routed[0][i:i + 1])[0].clamp(0, 1)
        elif torch.isfinite(self.threshold):
            map_threshold = self.map_threshold()
            norm_map = self.normalize(out.anomaly_map[i, 0], self.map_center, self.display_threshold()).clamp(0, 1)
        else:  # no threshold: min-max for display only
            m = out.anomaly_map[i, 0]
            norm_map = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
        mask = batch["mask"][i, 0].cpu().numpy() if bool(batch["has_mask"][i]) else None
        source = batch.get("source_size")
        stem = Path(batch["path"][i]).stem
        number = self.heatmap_numbers.get(batch["path"][i], len(self.heatmap_files))
        name = f"{number:03d}_{batch['category'][i]}_{batch['defect'][i]}_{stem}.png"
        path = self.heatmap_dir / name.replace("/", "_")
        if self._writer is None:
            self._writer = BackgroundWriter()
        # under DDP each rank writes the heatmaps of the images it scored
        self._writer.submit(path, distributed.as_own_output(save_heatmap), image=denormalize(batch["image"][i]),
                            norm_map=norm_map.float().cpu().numpy(), mask=mask,
                            score=float(out.pred_score[i]), threshold=float(threshold), map_threshold=map_threshold,
                            label=int(batch["label"][i]), defect=str(batch["defect"][i]),
                            height=int(self.heatmap_size),
                            source_size=shown_size(tuple(int(v) for v in source[i]),
                                                   *(self.source_geometry or (None, None)))
                            if source is not None else None)
        self.heatmap_files.append(str(path))

    def test_results(self) -> dict[str, Any]:
        return self.evaluator.compute() if self.evaluator is not None else {}

    def test_results_by_category(self) -> dict[str, dict]:
        """Each category's pixel metrics (where ``pixel_by_category``), else {}."""
        return self.evaluator.compute_groups() if self.evaluator is not None else {}

    def test_pixels_at_threshold(self) -> dict | None:
        """The test's pixel decisions at ``pixel_threshold`` (where it decides), else None."""
        return self.evaluator.compute_pixels_at_threshold() if self.evaluator is not None else None

    def test_results_spro(self) -> dict | None:
        """AU-sPRO of the test (where ``spro_groups``), else None."""
        return self.evaluator.compute_spro() if self.evaluator is not None else None

    def pixel_exactness(self) -> dict[str, Any]:
        """Whether the test's pixel metrics are exact, and how far from exact they can be
        (``pixel_error_bounds``, 0 when exact); both None without pixel metrics."""
        ev = self.evaluator
        if ev is None or not getattr(ev, "pixel_metrics", False) or ev.pixel.num_regions == 0:
            return {"pixel_metrics_exact": None, "pixel_error_bounds": None}
        bounds = ev.pixel.error_bounds()
        return {"pixel_metrics_exact": bool(ev.pixel.exact),
                "pixel_error_bounds": {k: float(v) for k, v in bounds.items()}}
