"""Hot update of a training-free model (HETMM): add normal images without retraining.

    python -m adtrain.templates add checkpoint=RUN/checkpoints/model.ckpt images='DIR_OR_GLOB'
        [out=NEW.ckpt] [recompress=false] [batch_size=8] [device=auto]

Writes the updated checkpoint atomically (in place unless out= is given). The checkpoint remembers
the images hot updates gave it (a digest of each file's bytes): an image added by an earlier update
is skipped, and said, not added twice (the training normals are not recorded: re-adding one of them
adds it again). The fitted thresholds are kept (and said): more templates lower normal scores, so the
model flags fewer images than at its fit; a new fit refits them. Python API:
`adtrain.templates.add_images(checkpoint, images, out=None)`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from adtrain.errors import ConfigError

log = logging.getLogger("adtrain")
DEFAULTS = {"checkpoint": None, "images": None, "out": None, "recompress": False, "batch_size": 8, "device": "auto"}
#: the checkpoint's record of the images hot updates gave it (sha256 of each file's bytes)
ADDED_KEY = "added_image_digests"


def add_images(checkpoint: str, images: str, out: str | None = None, recompress: bool = False,
               batch_size: int = 8, device: str = "auto") -> dict:
    from adtrain.build import _instantiate
    from adtrain.data.download import file_digest
    from adtrain.loading import load_method, save_method
    from adtrain.predict import _check_args, list_images

    from adtrain.io import writable_folder

    dev = _check_args(batch_size, device)  # one-line errors for batch_size=0, device=cuda without a GPU
    if not isinstance(recompress, bool):  # "maybe" was true
        raise ConfigError("recompress", f"must be true or false, got {recompress!r}")
    path = Path(out) if out else Path(checkpoint)
    if out and path.is_dir():  # said before the templates are built, not as a traceback after
        raise ConfigError("out", f"{path} is a folder: give a file, e.g. out={path / 'model.ckpt'}")
    if out:
        writable_folder(path.parent, "out", "the updated checkpoint's folder")
    method, cfg, ckpt = load_method(checkpoint)
    if not hasattr(method, "add_normal_images"):
        raise ConfigError("checkpoint", f"method '{cfg.method.name}' has no hot update (training-free methods only, e.g. hetmm)")
    method.to(dev)
    files = list_images(images)
    known = set(ckpt.get(ADDED_KEY) or ())
    seen, new = set(known), []
    for f in files:  # one of each distinct file, in the given order, none that an earlier update added
        digest = file_digest(Path(f), "sha256")
        if digest not in seen:
            seen.add(digest)
            new.append(f)
    if len(new) < len(files):
        log.warning("templates: %d of %d images were added before (the same bytes, to this checkpoint or twice in "
                    "this call): skipped, not added twice", len(files) - len(new), len(files))
    dm = _instantiate(cfg.data, "data", drop=("name",))
    before = method.model.num_templates
    batches = DataLoader(dm.predict_dataset(new), batch_size=batch_size) if new else []
    for batch in tqdm(batches, desc="templates", unit="batch"):
        method.add_normal_images(batch["image"], recompress=False)
    if recompress:  # re-run PTS over the enlarged set (tiny-set models only)
        method.model.compressed.fill_(False)
        method.finalize()
    after = method.model.num_templates
    if new:  # more normal templates lower normal scores: the held-out normals' quantile is not refitted
        log.warning("templates: the threshold (%.4g) and the pixel threshold stay those fitted on the run's held-out "
                    "normals; with more templates normal scores fall, so it now flags fewer images (fewer false "
                    "alarms, possibly more missed defects): fit the run again to refit them",
                    float(method.threshold))
    extra = {k: v for k, v in ckpt.items() if k not in ("state_dict", "adtrain_config")}
    extra[ADDED_KEY] = sorted(seen)
    save_method(method.cpu(), path, extra)
    log.info("templates: %d -> %d (%d images added); saved %s", before, after, len(new), path)
    return {"before": before, "after": after, "added_images": len(new), "skipped_images": len(files) - len(new),
            "checkpoint": str(path)}


def main(argv: list[str] | None = None) -> None:
    from adtrain.cli import command, options

    def body(argv: list[str]) -> None:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        if not argv or argv[0] != "add":
            raise ConfigError("command", "usage: python -m adtrain.templates add checkpoint=... images=...")
        args = options(argv[1:], DEFAULTS, text=("checkpoint", "images", "out", "device"))
        for key in ("checkpoint", "images"):
            if not args[key]:
                raise ConfigError(key, "required")
        add_images(**args)  # its log line says what changed

    command("adtrain.templates", __doc__, body, argv)


if __name__ == "__main__":
    main()
