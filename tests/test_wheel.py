"""The wheel works anywhere: built from the sources, installed (without dependencies) into a fresh
venv in a temporary directory that reuses this environment's packages, and run from a directory
outside the checkout: the configs come from the package, every console script is there, and a tiny
multirun goes through submitit's local executor (what hydra/launcher=slurm submits, without SLURM)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import TEST_THREADS
from tests.test_launchers import TINY

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("adtrain", "adtrain-predict", "adtrain-bench", "adtrain-templates")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src-copy"  # build from a copy: nothing (build/, egg-info) is written into the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "local", "*.pyc"))
    local = src / "src" / "adtrain" / "conf" / "local"  # a machine's overrides: never packaged
    local.mkdir()
    (local / "default.yaml").write_text("# @package _global_\nseed: 77\n")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp / "dist").glob("adtrain-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # the dependencies (torch, lightning, hydra, ...) from this environment, after the venv's own
    # site-packages: its adtrain is the wheel's (this environment's .pth files, e.g. an editable
    # install of adtrain, are not processed from a path added this way)
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_adtrain_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ADTRAIN_CONFIG_DIR")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS=TEST_THREADS)
    return {"wheel": wheel, "venv": venv, "work": work, "env": env}


def _run(w, *cmd, **kw):
    return subprocess.run([str(w["venv"] / "bin" / cmd[0]), *cmd[1:]], cwd=w["work"], env={**w["env"], **kw},
                          capture_output=True, text=True, timeout=600)


def test_wheel_holds_configs_typing_marker_and_console_scripts(wheel_venv):
    names = zipfile.ZipFile(wheel_venv["wheel"]).namelist()
    confs = {n.split("adtrain/conf/", 1)[1] for n in names if n.startswith("adtrain/conf/")}
    in_checkout = {str(p.relative_to(ROOT / "src/adtrain/conf")) for p in (ROOT / "src/adtrain/conf").rglob("*.yaml")
                   if "local" not in p.parts}
    assert in_checkout and in_checkout <= confs, sorted(in_checkout - confs)
    assert not [n for n in names if "conf/local" in n]
    assert "adtrain/py.typed" in names and "adtrain/methods/hetmm/hetmm_categories.yaml" in names
    (ep,) = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel_venv["wheel"]).read(ep).decode()
    for script in SCRIPTS:
        assert f"{script} = " in text
        assert (wheel_venv["venv"] / "bin" / script).exists()
    meta = zipfile.ZipFile(wheel_venv["wheel"]).read([n for n in names if n.endswith("METADATA")][0]).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    faiss = [line for line in requires if "faiss" in line]
    assert faiss and all("extra ==" in line for line in faiss), faiss  # not a default dependency


def test_installed_wheel_runs_outside_the_checkout(wheel_venv):
    w = wheel_venv
    where = _run(w, "python", "-c", "import adtrain, adtrain.__main__ as m; print(adtrain.__file__); print(m.config_dir())")
    assert where.returncode == 0, where.stderr
    pkg, conf = where.stdout.split()
    assert pkg.startswith(str(w["venv"])) and conf.startswith(str(w["venv"])), where.stdout
    job = _run(w, "adtrain", "--cfg", "job", "method=patchcore", "experiment=ucad_mvtec_dfm")
    assert job.returncode == 0, job.stderr
    assert "_target_: adtrain.methods.patchcore.Patchcore" in job.stdout and "mvtec_15" in job.stdout
    for script in ("adtrain-predict", "adtrain-templates"):  # resolve and answer in one line
        p = _run(w, script)
        assert p.returncode == 2 and "error" in p.stderr.strip().splitlines()[-1], (script, p.stderr)
    # ADTRAIN_CONFIG_DIR still wins over the package's configs
    own = w["work"] / "my-conf"
    shutil.copytree(Path(conf), own)
    (own / "config.yaml").write_text((own / "config.yaml").read_text().replace("\nseed: 0\n", "\nseed: 123\n"))
    assert "seed: 123" in _run(w, "adtrain", "--cfg", "job", ADTRAIN_CONFIG_DIR=str(own)).stdout
    bad = _run(w, "adtrain", "--cfg", "job", ADTRAIN_CONFIG_DIR=str(w["work"] / "nowhere"))
    assert bad.returncode != 0 and "ADTRAIN_CONFIG_DIR" in bad.stderr


def test_installed_wheel_runs_a_tiny_job_through_submitits_local_executor(wheel_venv):
    w = wheel_venv
    sweep = w["work"] / "sweep"
    p = _run(w, "adtrain", "-m", *TINY, "seed=3", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
             f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((sweep / "0" / "results.json").read_text())
    assert res["seed"] == 3 and res["image_auroc"] is not None and res["num_test"] == 8
    assert (sweep / "summary.csv").read_text().count("\n") == 2  # header + the job
    assert list((sweep / ".submitit").rglob("*_result.pkl"))  # it went through submitit
    assert (sweep / "0" / "checkpoints" / "model.ckpt").exists()
