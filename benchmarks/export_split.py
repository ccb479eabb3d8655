"""Write adtrain's data split as JSON for benchmarks/anomalib_baseline.py (same images on both sides).

    .venv/bin/python benchmarks/export_split.py data=elpv data.category=mono --out split.json

`train` = the images adtrain trains on (train/good minus the held-out 20 %), `test_normal` and
`test_anomalous` = adtrain's test set.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from hydra import compose, initialize_config_dir

    from adtrain.__main__ import config_dir
    from adtrain.build import build_datamodule

    args = sys.argv[1:]
    if "-h" in args or "--help" in args or "--out" not in args or args.index("--out") + 1 >= len(args):
        print(__doc__.strip())
        raise SystemExit(0 if ("-h" in args or "--help" in args) else 2)
    out = args[args.index("--out") + 1]
    overrides = [a for a in args if "=" in a]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    dm = build_datamodule(cfg)
    split = {
        "train": [s.path for s in dm.train_samples],
        "test_normal": [s.path for s in dm.test_samples if s.label == 0],
        "test_anomalous": [s.path for s in dm.test_samples if s.label == 1],
    }
    json.dump(split, open(out, "w"), indent=1)
    print({k: len(v) for k, v in split.items()})


if __name__ == "__main__":
    main()
