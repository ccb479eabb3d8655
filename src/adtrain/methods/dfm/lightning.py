"""DFM as a LightningModule: manual optimisation of two alternating stages (docs/methods/dfm.md).

Epoch e of a cycle of stage1_epochs + stage2_epochs epochs: stage 1 (adapters, normal images,
hinge losses that compress normal scores) or stage 2 (FMN memory + modulate layers: with
``stage2_objective=supervised`` (the paper) normal images and synthetic anomalies with masks, with
``compress`` the same hinge on normal images only). The memory is initialised (greedy coreset of the
adapted training features) before the first epoch and rebuilt at the first stage-2 epoch of
every cycle. Continual schedules: per-task state and UCAD task keys (see ``continual.py``).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from adtrain.data.cutpaste import CutPasteConfig, cutpaste_batch
from adtrain.errors import ConfigError
from adtrain.methods.base import AnomalyModule
from adtrain.methods.chunks import cpu_chunks
from adtrain.methods.val_maps import coarse_size
from adtrain.methods.dfm.continual import DfmContinualMixin
from adtrain.methods.dfm.embed_cache import ValidationFeatureCache
from adtrain.methods.dfm.torch_model import DfmModel
from adtrain.methods.output import AnomalyOutput, concat

log = logging.getLogger("adtrain")
ANOMALY_SOURCES = ("cutpaste", "data", "both")
STAGE2_OBJECTIVES = ("supervised", "compress")


class Dfm(DfmContinualMixin, AnomalyModule):
    #: round 0 is the untrained host (PatchCore's or CFA's matching): a selection candidate
    start_is_detector: bool = True

    def __init__(
        self,
        backbone: dict,
        host: str = "patchcore",
        layers=None,
        adapter_layers=None,
        pool_size: int = 3,
        blur_sigma: float = 4.0,
        blur_mode: str = "reflect",
        cfa_gamma_d: int = 1,
        memory_size: int | None = 196,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        max_memory_features: int | None = None,
        ram_check: bool = True,
        num_keys: int = 196,
        candidates: int = 8,
        row_chunk: int = 8192,
        mem_chunk: int = 4096,
        rounds: int = 1,
        stage1_epochs: int = 0,
        stage2_epochs: int = 5,
        lr_adapter: float = 1e-4,
        lr_fmn: float = 1.5e-2,
        stage2_objective: str = "compress",
        weight_decay: float = 0.0,
        beta: float = 0.9,
        gamma: float = 1.1,
        lambda_det: float = 1.0,
        lambda_seg: float = 1.0,
        cutpaste: dict | None = None,
        anomalies: str = "cutpaste",
        clip_grad_norm: float | None = None,
        train_modulates: bool = False,
        validate_every: str = "round",
        task_score_norm: str = "normal",
        task_routing: str = "keys",
        val_cache_mb: float = 1024.0,
        seed: int = 0,
        model: DfmModel | None = None,
    ) -> None:
        super().__init__()
        for key, val in (("rounds", rounds), ("stage1_epochs", stage1_epochs), ("stage2_epochs", stage2_epochs)):
            if int(val) < (1 if key == "rounds" else 0):
                raise ConfigError(f"method.{key}", f"must be >= {1 if key == 'rounds' else 0}, got {val}")
        if int(stage1_epochs) + int(stage2_epochs) < 1:
            raise ConfigError("method.stage1_epochs", "stage1_epochs + stage2_epochs must be >= 1")
        if stage2_objective not in STAGE2_OBJECTIVES:
            raise ConfigError("method.stage2_objective",
                              f"must be one of {STAGE2_OBJECTIVES}, got {stage2_objective!r}")
        if anomalies not in ANOMALY_SOURCES:
            raise ConfigError("method.anomalies", f"must be one of {ANOMALY_SOURCES}, got {anomalies!r}")
        if not 0.0 < float(beta) <= 1.0:
            raise ConfigError("method.beta", f"must be in (0, 1], got {beta}")
        if float(gamma) <= 0.0:
            raise ConfigError("method.gamma", f"must be > 0, got {gamma}")
        if validate_every not in ("round", "epoch"):
            raise ConfigError("method.validate_every", f"must be 'round' or 'epoch', got {validate_every!r}")
        for key, value in (("candidates", candidates), ("row_chunk", row_chunk), ("mem_chunk", mem_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"method.{key}", f"must be a whole number >= 1, got {value!r}")
        self.model = model if model is not None else DfmModel(
            backbone, host=host, layers=layers, adapter_layers=adapter_layers, pool_size=pool_size,
            blur_sigma=blur_sigma, blur_mode=blur_mode, cfa_gamma_d=cfa_gamma_d, memory_size=memory_size, coreset_ratio=coreset_ratio,
            projection_dim=projection_dim, max_memory_features=max_memory_features, ram_check=ram_check, num_keys=num_keys,
            candidates=candidates, row_chunk=row_chunk, mem_chunk=mem_chunk, seed=seed)
        self.automatic_optimization = False
        self.rounds, self.e1, self.e2 = int(rounds), int(stage1_epochs), int(stage2_epochs)
        self.lr_adapter, self.lr_fmn, self.weight_decay = float(lr_adapter), float(lr_fmn), float(weight_decay)
        self.beta, self.gamma = float(beta), float(gamma)
        self.lambda_det, self.lambda_seg = float(lambda_det), float(lambda_seg)
        self.cutpaste = CutPasteConfig.from_any(cutpaste)
        self.anomalies = anomalies
        self.stage2_objective = stage2_objective
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.train_modulates = bool(train_modulates)
        #: selection candidates at the end of every round (or every epoch); run.py may override it
        self.val_every_n_epochs = (self.e1 + self.e2) if validate_every == "round" else 1
        self.rebuilt_round = -1  # the round whose stage-1 adapters the memory was last rebuilt from
        self.stage = 1 if self.e1 > 0 else 2
        self.memory_builds = 0
        if self.e1 > 0 and not self.model.adapter_parameters():
            raise ConfigError("method.stage1_epochs", "stage 1 trains the adapters, but there are none "
                              "(method.adapter_layers is empty): set stage1_epochs=0")
        if not float(val_cache_mb) >= 0:
            raise ConfigError("method.val_cache_mb", f"must be >= 0 (0 = off), got {val_cache_mb}")
        #: validation features reused while what computes them is unchanged (embed_cache.py)
        self.val_cache = ValidationFeatureCache(val_cache_mb)
        self._val_key: tuple | None = None
        self.init_continual(task_score_norm, task_routing)

    # ----------------------------------------------------------------- schedule
    def schedule(self, epoch: int) -> tuple[int, int, int]:
        """(round, stage 1|2, position in the cycle) of an epoch."""
        cycle = self.e1 + self.e2
        rnd, pos = divmod(int(epoch), cycle)
        return rnd, (1 if pos < self.e1 else 2), pos

    #: stage 1 trains the adapters, stage 2 the memory: under DDP each stage leaves the other's unused
    ddp_find_unused_parameters = True

    def on_fit_start(self) -> None:
        expected = self.rounds * (self.e1 + self.e2)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0 and max_epochs != expected:
            log.warning("DFM: trainer.max_epochs=%s but method.rounds * (stage1_epochs + stage2_epochs) = %d; the "
                        "stages cycle (%d + %d epochs) until max_epochs", max_epochs, expected, self.e1, self.e2)

    def on_train_epoch_start(self) -> None:
        rnd, stage, pos = self.schedule(self.current_epoch)
        if not self.model.fmn.ready:
            self.build_memory(with_keys=self.task_open, reset_patch=True)
        elif stage == 2 and pos == self.e1 and self.e1 > 0:
            self._rebuild(rnd)
        self.set_stage(stage)

    def _rebuild(self, rnd: int) -> None:
        """The memory rebuilt from the adapters stage 1 of round ``rnd`` trained (once per round)."""
        if self.rebuilt_round == rnd:
            return
        self.build_memory()
        self._reset_memory_moments()
        self.rebuilt_round = rnd

    def on_validation_epoch_start(self) -> None:
        if self._trainer is None:
            return
        fn = self.trainer.state.fn
        # the untrained start is validated before the first training epoch: the memory must exist
        if not self.model.fmn.ready and fn in ("fit", "validate"):
            self.build_memory(with_keys=self.task_open, reset_patch=True)
        elif fn == "fit" and not self.trainer.sanity_checking:
            rnd, stage, pos = self.schedule(self.current_epoch)
            if stage == 1 and pos == self.e1 - 1:  # a round that ends with stage 1 validates the rebuilt memory
                self._rebuild(rnd)
        if self.val_cache.enabled and self.validating_now():
            m = self.model
            if m.adapters.inside:  # ViT: the patch features P, computed through the adapters and head
                self.val_cache.sync([m.adapters, m.head], [m.extractor])
            else:  # CNN: the frozen extractor's features, whatever the adapters and head do after it
                self.val_cache.sync([], [m.extractor])
                if self.task_open:  # a continual task's candidate: its outputs may serve the routed validation
                    self.val_states.append((self.val_cache.generation, self.trainable_state()))

    def on_fit_end(self) -> None:
        cache = self.val_cache
        if cache.enabled:
            log.info("DFM validation feature cache: %d batches reused, %d computed", cache.hits, cache.misses)
        if not self.task_open:  # a continual task's entries serve the routed validation after the last task
            cache.clear()
        cache.hits = cache.misses = 0

    def cached_features(self, images: torch.Tensor, chunks: list[slice], key: tuple | None = None) -> list | None:
        """In a validation pass with the cache on: the extractor's features of each chunk (CNN) or
        the patch features P (ViT), from ``val_cache`` where this batch was computed before."""
        if not self.caching_validation():
            return None
        m = self.model
        return self.val_cache.get(images, chunks, m.embed if m.adapters.inside else m.extract, key)

    def caching_validation(self) -> bool:
        return self._val_key is not None and self.val_cache.enabled and not self.model.training

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_key = (dataloader_idx, batch_idx)
        try:
            super().validation_step(batch, batch_idx)
        finally:
            self._val_key = None

    def validation_output(self, images: torch.Tensor) -> AnomalyOutput:
        """Maps at the validation's coarse size, straight from the patch scores (``reduced_map``)."""
        with self.model.reduced_maps(coarse_size):
            return self.anomaly_output(images)

    def anomaly_output(self, images: torch.Tensor) -> AnomalyOutput:
        """In validation, the features come from ``val_cache`` (``cached_features``); everything
        after them runs as in an uncached pass (same chunks), so the outputs are equal."""
        if self.routing or not self.caching_validation():
            return super().anomaly_output(images)
        if images.dtype == torch.uint8:
            images = self.model_input(images)
        m, size, chunks = self.model, images.shape[-2:], cpu_chunks(images, self.cpu_chunk_pixels)
        key = self.val_cache.key(images, chunks)
        feats = self.cached_features(images, chunks, key)
        if not m.adapters.inside:
            out = concat([m.output_from(f, size) for f in feats])
            if self.task_open:  # kept for the routed validation if this state is the task's (end_task)
                self.val_cache.put((key, "output", self.val_cache.generation), out)
            return out
        outs = []
        for emb in feats:
            patch, score = m.fmn(emb)
            outs.append(AnomalyOutput(m.anomaly_map(patch, size), score))
        return concat(outs)

    def on_train_end(self) -> None:
        for p in self.model.adapter_parameters() + self.model.fmn_parameters():
            p.requires_grad_(True)

    def set_stage(self, stage: int) -> None:
        """Only the stage's own parameters require gradients."""
        self.stage = int(stage)
        for p in self.model.adapter_parameters():
            p.requires_grad_(stage == 1)
        for p in self.model.fmn_parameters():
            p.requires_grad_(stage == 2 and (self.train_modulates or p is self.model.fmn.memory))

    # ----------------------------------------------------------------- memory
    def _normal_loader(self):
        trainer = self.trainer
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "make_dataloader"):
            return dm.make_dataloader(dm.train_samples, train=False)  # eval transform, no augmentation
        return trainer.train_dataloader

    def _normal_images(self, loader):
        for batch in loader:
            images = batch["image"]
            if "label" in batch:
                images = images[batch["label"] == 0]
            if images.shape[0]:
                yield self.model_input(images)  # uint8 (data.device_normalize) normalised on the device

    def build_memory(self, batches=None, with_keys: bool = False, reset_patch: bool = False) -> dict:
        """(Re)build the FMN memory from the training normals (one pass, no gradients)."""
        was = self.model.training
        self.model.eval()
        ctx = self.trainer.precision_plugin.forward_context() if self._trainer is not None else _null()
        try:
            with ctx:
                loader = self._normal_loader() if batches is None else None
                try:  # the number of batches: the host-memory check after the first (DfmModel.build_memory)
                    expected = len(loader) if loader is not None else None
                except TypeError:  # an iterable data set
                    expected = None
                info = self.model.build_memory(batches if batches is not None else self._normal_images(loader),
                                               with_keys=with_keys, reset_patch=reset_patch,
                                               expected_batches=expected)
        finally:
            self.model.train(was)
        self.memory_builds += 1
        self._scale_memory_lr()
        if "keys" in info:
            self.pending_key = info.pop("keys")
        log.info("DFM memory build %d: %d items on a %s grid; typical nearest distance r = %.4g over D = %d "
                 "coordinates, so stage 2's memory rate is lr_fmn %.3g * r / sqrt(D) = %.3g", self.memory_builds,
                 info["memory_size"], info["grid"], float(self.model.fmn.dist_ref), self.model.fmn.dim,
                 self.lr_fmn, self.memory_lr())
        return info

    def memory_lr(self) -> float:
        """lr_fmn in feature units: times the typical per-coordinate distance r / sqrt(D), so one
        value fits any backbone (EfficientNet-Lite0 on ELPV: r = 24.56, D = 152, 1.5e-2 -> 3.0e-2; the memory build's log line)."""
        fmn = self.model.fmn
        return self.lr_fmn * float(fmn.dist_ref) / math.sqrt(fmn.dim) if fmn.ready else self.lr_fmn

    def _scale_memory_lr(self) -> None:
        if self._trainer is None or 2 not in getattr(self, "_opt_index", {}):
            return
        opts = self.trainer.optimizers
        if len(opts) > self._opt_index[2]:
            for group in opts[self._opt_index[2]].param_groups:
                group["lr"] = self.memory_lr()

    def _reset_memory_moments(self) -> None:
        """New memory items: forget the optimiser moments of the item-indexed parameters."""
        fmn = self.model.fmn
        for opt in self.trainer.optimizers if self._trainer is not None else []:
            for p in (fmn.memory, fmn.mem_scale, fmn.mem_shift):
                opt.state.pop(p, None)

    # ----------------------------------------------------------------- losses
    def stage1_loss(self, normal: torch.Tensor) -> dict[str, torch.Tensor]:
        """Compress normal scores through the adapters (the matching fixed)."""
        return self.compress_loss(*self.model.score(normal))

    def stage2_compress_loss(self, normal: torch.Tensor) -> dict[str, torch.Tensor]:
        """stage2_objective=compress: the same hinge, on the memory (features fixed): the items move
        to cover the tail of the normal patches' nearest distances (a gradient refinement of the
        greedy coreset's k-center cover; docs/methods/dfm.md, "Stage 2 on normal images only")."""
        with torch.no_grad():
            emb = self.model.embed(normal)
        return self.compress_loss(*self.model.fmn(emb))

    def compress_loss(self, maps: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hinge above beta * the batch's max normal score, at image and patch level (targets detached)."""
        ref = self.model.fmn.dist_ref
        t_img = (self.beta * scores.max()).detach()
        t_seg = (self.beta * maps.max()).detach()
        l_img = F.relu(scores - t_img).mean() / ref
        l_seg = F.relu(maps - t_seg).mean() / ref
        return {"loss": self.lambda_det * l_img + self.lambda_seg * l_seg, "hinge_img": l_img, "hinge_seg": l_seg}

    def stage2_loss(self, normal: torch.Tensor, anomalous: torch.Tensor, masks: torch.Tensor) -> dict:
        """L_sup = lambda_det L_detec + lambda_seg L_seg on the FMN (features fixed)."""
        n = normal.shape[0]
        with torch.no_grad():
            emb = self.model.embed(torch.cat([normal, anomalous.to(normal.dtype)]))
        maps, scores = self.model.fmn(emb)
        ref = self.model.fmn.dist_ref
        s_n, s_a, m_n, m_a = scores[:n], scores[n:], maps[:n], maps[n:]
        t_img = (self.gamma * s_n.max()).detach()
        t_seg = (self.gamma * m_n.max()).detach()
        l_det = (F.relu(t_img - s_a).mean() + (s_n - s_n.mean()).abs().mean()) / ref
        w = F.adaptive_avg_pool2d(masks.float(), tuple(m_a.shape[-2:])).squeeze(1)
        l_seg = (w * F.relu(t_seg - m_a)).sum() / w.sum().clamp_min(1e-6) / ref
        return {"loss": self.lambda_det * l_det + self.lambda_seg * l_seg, "detec": l_det, "seg": l_seg}

    def synthetic_anomalies(self, batch: dict, normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomalous images and masks for stage 2: CutPaste of the normals (global torch RNG) and/or
        the data module's synthetic anomalies (label 1 items of the batch)."""
        images, masks = [], []
        if self.anomalies in ("cutpaste", "both") and normal.shape[0]:
            x, m = cutpaste_batch(normal, self.cutpaste)
            images.append(x)
            masks.append(m)
        if self.anomalies in ("data", "both"):
            sel = batch["label"] == 1
            images.append(batch["image"][sel])
            masks.append(batch["mask"][sel].to(batch["image"].dtype))
        if not images:
            return normal[:0], normal[:0, :1]
        return torch.cat(images), torch.cat(masks)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        opts = []
        self._opt_index = {}
        adapter = self.model.adapter_parameters()
        if adapter:
            self._opt_index[1] = len(opts)
            opts.append(torch.optim.Adam(adapter, lr=self.lr_adapter, weight_decay=self.weight_decay))
        self._opt_index[2] = len(opts)
        fmn = self.model.fmn_parameters() if self.train_modulates else [self.model.fmn.memory]
        opts.append(torch.optim.Adam(fmn, lr=self.memory_lr()))
        return opts

    def _optimizer(self, stage: int):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[self._opt_index[stage]]

    def training_step(self, batch: dict, batch_idx: int):
        images, labels = batch["image"], batch["label"]
        normal = images[labels == 0]
        if normal.shape[0] == 0:
            return None
        if self.stage == 1:
            losses = self.stage1_loss(normal)
        elif self.stage2_objective == "compress":
            losses = self.stage2_compress_loss(normal)
        else:
            anomalous, masks = self.synthetic_anomalies(batch, normal)
            if anomalous.shape[0] == 0:
                return None
            losses = self.stage2_loss(normal, anomalous, masks)
        loss = losses["loss"]
        self.check_finite(loss)
        opt = self._optimizer(self.stage)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.clip_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        n = images.shape[0]
        self.log(f"train/loss_stage{self.stage}", loss.detach(), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=n)
        for key, val in losses.items():
            if key != "loss":
                self.log(f"train/{key}", val.detach(), on_step=False, on_epoch=True, batch_size=n)
        self.log("train/stage", float(self.stage), on_step=False, on_epoch=True, batch_size=n)
        return loss.detach()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
