"""Sweeps optimise validation, never test: the objective, the hparams_search configs, the summary
grouped by swept overrides, and one real Optuna search that never opens a test image."""

import csv
import fcntl
import json
import math
import shutil
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from adtrain.errors import ConfigError, DataError
from adtrain.sweep import (
    OBJECTIVES, SweepSummary, check_direction, check_objective, dfm_schedule, objective, summarize,
    swept_keys,
)

CONF = Path(__file__).resolve().parents[1] / "src" / "adtrain" / "conf"
RESULTS = {"method": "patchcore", "image_auroc": 0.11, "val_image_auroc": 0.83, "val_pixel_auroc": 0.9,
           "val_pixel_aupro": None, "val_normal_score": 0.25}


# ---------------------------------------------------------------- the objective


def test_objective_is_the_named_validation_figure():
    assert objective(RESULTS, "val_image_auroc") == pytest.approx(0.83)
    assert objective(RESULTS, "val_normal_score") == pytest.approx(0.25)
    assert isinstance(objective({"val_pixel_auroc": 1}, "val_pixel_auroc"), float)
    # missing, null or not finite: None, which the Optuna sweeper records as a failed trial
    assert objective(RESULTS, "val_pixel_aupro") is None
    assert objective({"method": "stfpm"}, "val_image_auroc") is None
    assert objective({"val_image_auroc": float("nan")}, "val_image_auroc") is None
    assert objective(None, "val_image_auroc") is None
    assert objective(RESULTS, None) is None  # no objective at all


@pytest.mark.parametrize("metric", ["image_auroc", "pixel_aupro", "fit_seconds", "val_image_aurco"])
def test_a_test_metric_is_refused_as_objective(metric):
    with pytest.raises(ConfigError, match="optimized_metric") as err:
        check_objective(metric)
    assert err.value.key == "optimized_metric"
    with pytest.raises(ConfigError, match="optimized_metric"):
        objective(RESULTS, metric)  # even when the results hold it
    if metric == "image_auroc":
        assert "val_image_auroc" in str(err.value)  # the validation counterpart is named


def test_direction_must_match_the_metric(capsys):
    from hydra_plugins.hydra_optuna_sweeper.config import Direction

    check_direction("val_image_auroc", "maximize")
    check_direction("val_normal_score", Direction.minimize)
    check_direction("val_image_auroc", None)  # the basic sweeper has no direction
    with pytest.raises(ConfigError, match="hydra.sweeper.direction.*minimize"):
        check_direction("val_normal_score", "maximize")
    with pytest.raises(ConfigError, match="hydra.sweeper.direction"):
        check_direction("val_pixel_auroc", Direction.minimize)
    with pytest.raises(ConfigError, match="hydra.sweeper.direction"):
        check_direction("val_pixel_auroc", ["maximize", "minimize"])  # one objective only
    # the callback stops the sweep before the first job (Hydra would only warn on an exception)
    for metric, direction, key in (("image_auroc", "maximize", "optimized_metric"),
                                   ("val_normal_score", "maximize", "hydra.sweeper.direction")):
        cfg = OmegaConf.create({"optimized_metric": metric, "hydra": {"sweeper": {"direction": direction}}})
        with pytest.raises(SystemExit) as ex:
            SweepSummary().on_multirun_start(cfg)
        assert ex.value.code == 2 and f"'{key}'" in capsys.readouterr().err
    SweepSummary().on_multirun_start(OmegaConf.create({"optimized_metric": "val_normal_score",
                                                       "hydra": {"sweeper": {"direction": "minimize"}}}))


def test_a_sweep_into_an_earlier_sweeps_folder_is_refused_before_its_first_job(tmp_path, capsys):
    """Hydra rewrites each job's .hydra/ before the job refuses a finished run's folder, so the
    summary would show the old results under the new overrides: the sweep stops at its start."""
    sweep = tmp_path / "sweep"
    _job(sweep, 0, ["method.coreset_ratio=0.1"], {"method": "patchcore", "image_auroc": 0.9})

    def cfg(**top):
        return OmegaConf.create({"optimized_metric": None, **top, "hydra": {"sweep": {"dir": str(sweep)}}})

    with pytest.raises(SystemExit) as ex:
        SweepSummary().on_multirun_start(cfg())
    assert ex.value.code == 2 and "'hydra.sweep.dir'" in capsys.readouterr().err
    SweepSummary().on_multirun_start(cfg(resume=True))
    sweep_new = tmp_path / "fresh"
    SweepSummary().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_new)}}}))
    # an unseeded Optuna sampler proposes other trials: such a sweep cannot be resumed, said at once
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
              "sampler": {"_target_": "optuna.samplers.TPESampler", "seed": None}}
    unseeded = OmegaConf.create({"optimized_metric": None, "resume": True,
                                 "hydra": {"sweep": {"dir": str(sweep)}, "sweeper": optuna}})
    with pytest.raises(SystemExit) as ex:
        SweepSummary().on_multirun_start(unseeded)
    assert ex.value.code == 2 and "'hydra.sweeper.sampler.seed'" in capsys.readouterr().err
    unseeded.hydra.sweeper.sampler.seed = 7
    SweepSummary().on_multirun_start(unseeded)
    assert swept_keys([{"overwrite": "true", "a": "1"}, {"a": "2"}]) == ["a"]  # how a job ran is no column
    SweepSummary().on_multirun_start(cfg(overwrite=True))  # said on purpose: allowed (the earlier job deleted)
    assert not (sweep / "0").exists()


def test_a_second_sweep_into_a_running_sweeps_folder_is_refused_before_its_first_job(tmp_path, capsys):
    """Two sweeps in one folder (the default is named by the second a sweep starts: sweeps started
    together from a shell loop share it) mixed their jobs, each summary reading the other's results
    under its own overrides, and both exited 0. The running sweep holds the folder until it ends."""
    sweep = tmp_path / "sweep"
    cfg = OmegaConf.create({"optimized_metric": None, "hydra": {"sweep": {"dir": str(sweep)}}})
    holder = subprocess.Popen(  # another sweep's process, between its start and its end
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from adtrain.sweep_dir import "
         "lock_sweep_dir; lock_sweep_dir(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)", str(sweep)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as ex:
            SweepSummary().on_multirun_start(cfg)
        err = capsys.readouterr().err
        assert ex.value.code == 2 and f"in use by another sweep (pid {holder.pid})" in err and "hydra.sweep.dir=" in err
        assert "choose another hydra.sweep.dir" in err
    finally:
        holder.kill()
        holder.wait()
    SweepSummary().on_multirun_start(cfg)  # the process ended (killed): the folder is free again
    assert (sweep / ".adtrain.lock").read_text() == str(os.getpid())


def test_overwrite_deletes_the_earlier_sweeps_jobs_before_the_first_job(tmp_path, capsys):
    """overwrite=true on an earlier sweep's folder: a job the new sweep does not run again (fewer jobs,
    another subdir) used to stay and be summarised, and averaged, as one of the new sweep's. Every
    earlier job goes at the start, nested or failed ones too, unless a run still holds one."""
    sweep = tmp_path / "sweep"
    earlier = {"method": "stfpm", "data": "synthetic", "category": "texture", "backbone": "resnet18"}
    for seed in (0, 1, 2):
        _job(sweep, seed, [f"seed={seed}", "trainer.max_epochs=3"], {**earlier, "seed": seed, "image_auroc": 0.1})
    _job(sweep, "texture/seed3", ["seed=3"], {**earlier, "seed": 3, "image_auroc": 0.1})  # hydra.sweep.subdir nested
    (sweep / "grid" / "seed4").mkdir(parents=True)
    (sweep / "grid" / "seed4" / "error.txt").write_text("DataError: failed before Hydra's record")
    (sweep / "notes.txt").write_text("the user's, not a job's")
    summarize(sweep)

    def cfg(**top):
        return OmegaConf.create({"optimized_metric": None, **top, "hydra": {"sweep": {"dir": str(sweep)}}})

    for word in ("off", "no"):  # a string, which Python reads as true: never a reason to delete
        with pytest.raises(SystemExit) as ex:
            SweepSummary().on_multirun_start(cfg(overwrite=word))
        assert ex.value.code == 2 and "'overwrite'" in capsys.readouterr().err
    live = os.getpid()
    (sweep / "2" / ".adtrain.lock").write_text(str(live))
    with open(sweep / "2" / ".adtrain.lock", "r+") as held:  # a run still going in job 2
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as ex:
            SweepSummary().on_multirun_start(cfg(overwrite=True))
        said = capsys.readouterr().err
        assert ex.value.code == 2 and "'hydra.sweep.dir'" in said and f"{sweep / '2'}" in said and f"pid {live}" in said
    left = sorted(str(p.parent.relative_to(sweep)) for p in sweep.glob("**/results.json"))
    assert left == ["0", "1", "2", "texture/seed3"] and (sweep / "summary.csv").exists()  # nothing deleted

    SweepSummary().on_multirun_start(cfg(overwrite=True))
    kept = sorted(p.name for p in sweep.iterdir())  # no job, no empty texture/, no summary; the sweep's lock
    assert kept == [".adtrain.lock", "notes.txt"]
    for num, seed in enumerate((5, 6)):  # the new sweep's jobs
        _job(sweep, num, [f"seed={seed}", "trainer.max_epochs=1"], {**earlier, "seed": seed, "image_auroc": 0.9})
    rows = list(csv.DictReader(open(summarize(sweep)[0])))
    assert [(r["job"], r["seed"]) for r in rows] == [("0", "5"), ("1", "6")]
    assert "trainer.max_epochs" not in rows[0]  # one value in this sweep: no swept column


def test_a_sweep_folder_that_also_holds_single_runs_is_refused(tmp_path, capsys):
    """hydra.sweep.dir=outputs overwrite=true, outputs/ holding the user's single runs beside an earlier
    sweep's jobs: every folder with a .hydra/ record went. Hydra's record says which made each folder
    (hydra.mode RUN or MULTIRUN): the sweep stops naming one, nothing deleted; without a flag the
    refusal no longer offers overwrite=true. (resume=true goes on: one job run again alone into its
    folder is a single run there.)"""
    sweep = tmp_path / "outputs"
    base = {"method": "patchcore", "data": "synthetic", "category": "texture", "backbone": "resnet18"}
    for num in (0, 1):
        _job(sweep, num, [f"seed={num}"], {**base, "seed": num, "image_auroc": 0.5})
        OmegaConf.save(OmegaConf.create({"hydra": {"mode": "MULTIRUN"}}), sweep / str(num) / ".hydra" / "hydra.yaml")
    single = sweep / "2026-12-01" / "12-00-00"
    _job(single.parent, single.name, ["method=patchcore"], {**base, "seed": 0, "image_auroc": 0.9})
    OmegaConf.save(OmegaConf.create({"hydra": {"mode": "RUN", "run": {"dir": "${now:%H}"}}}),
                   single / ".hydra" / "hydra.yaml")

    def cfg(**flags):
        return OmegaConf.create({"optimized_metric": None, **flags, "hydra": {"sweep": {"dir": str(sweep)}}})

    for flags in ({"overwrite": True}, {}):  # deleted; the refusal offered overwrite=true
        with pytest.raises(SystemExit) as ex:
            SweepSummary().on_multirun_start(cfg(**flags))
        said = capsys.readouterr().err
        assert ex.value.code == 2 and "'hydra.sweep.dir'" in said and "1 single run(s)" in said, flags
        assert str(single) in said and "overwrite=true / resume=true" not in said
        assert len(list(sweep.glob("**/results.json"))) == 3
    shutil.rmtree(sweep / "2026-12-01")
    SweepSummary().on_multirun_start(cfg(overwrite=True))  # a sweep's jobs alone: deleted as before
    assert [p.name for p in sweep.iterdir()] == [".adtrain.lock"]  # this sweep's, held until it ends


def test_overwrite_keeps_another_sweep_kept_inside_the_sweep_folder(tmp_path, capsys):
    """hydra.sweep.dir=multirun/a, later multirun/a/b: overwrite=true of a counted b's jobs as its own
    and deleted them. Another multirun.yaml below the folder stops it, naming that sweep's folder."""
    sweep = tmp_path / "a"
    base = {"method": "patchcore", "data": "synthetic", "category": "texture", "backbone": "resnet18"}
    _job(sweep, 0, ["seed=0"], {**base, "seed": 0, "image_auroc": 0.5})
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    inner = sweep / "b"
    _job(inner, 0, ["seed=1"], {**base, "seed": 1, "image_auroc": 0.7})
    (inner / "multirun.yaml").write_text("hydra: {}\n")
    cfg = OmegaConf.create({"optimized_metric": None, "overwrite": True, "hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as ex:
        SweepSummary().on_multirun_start(cfg)
    said = capsys.readouterr().err
    assert ex.value.code == 2 and f"another sweep's folder ({inner}" in said and "nothing was deleted" in said
    assert len(list(sweep.glob("**/results.json"))) == 2
    inner.rename(tmp_path / "b")
    SweepSummary().on_multirun_start(cfg)  # its own jobs alone: deleted as before
    assert not list(sweep.glob("**/results.json")) and (tmp_path / "b" / "0" / "results.json").exists()


def test_a_sweep_whose_jobs_cannot_give_its_objective_is_refused_at_its_start(fast_cfg, capsys):
    """Found trial by trial, these burn every Optuna trial and end in 'No trials are completed yet'."""
    for overrides, key in ((["schedule=synthetic_3", "test=false"], "'test'"),
                           (["data.val_split=0"], "'data.val_split'"),
                           (["data.val_anomalies=null"], "'data.val_anomalies'")):
        with pytest.raises(SystemExit) as ex:
            SweepSummary().on_multirun_start(fast_cfg(*overrides))
        assert ex.value.code == 2 and key in capsys.readouterr().err, overrides
    SweepSummary().on_multirun_start(fast_cfg("data.val_anomalies=null", "optimized_metric=val_normal_map_mean"))
    SweepSummary().on_multirun_start(fast_cfg("schedule=synthetic_3", "test=true"))


def test_a_crashing_job_fails_alone_in_a_sweep(fast_cfg, monkeypatch):
    """An error that is not adtrain's (CUDA out of memory, a library's) ends that job with no
    objective (a failed trial); the sweep goes on. A single run still raises it."""
    import adtrain.__main__ as entry
    import adtrain.run
    from adtrain.__main__ import main

    def crash(cfg):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(adtrain.run, "run", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(fast_cfg())
    monkeypatch.setattr(entry, "_is_multirun", lambda: True)
    assert main(fast_cfg()) is None


def test_main_returns_the_optimized_validation_metric(fast_cfg, monkeypatch, capsys, caplog):
    import logging

    import adtrain.__main__ as entry
    import adtrain.run
    from adtrain.__main__ import main

    monkeypatch.setattr(adtrain.run, "run", lambda cfg: dict(RESULTS))
    assert main(fast_cfg()) == pytest.approx(0.83)  # the config's default: val_image_auroc
    assert main(fast_cfg("optimized_metric=val_normal_score")) == pytest.approx(0.25)
    with caplog.at_level(logging.WARNING, logger="adtrain"):
        assert main(fast_cfg("optimized_metric=val_pixel_aupro")) is None  # null: a failed trial...
        assert "failed trial" not in caplog.text  # ...said only where a sweeper reads it
        monkeypatch.setattr(entry, "_is_multirun", lambda: True)
        assert main(fast_cfg("optimized_metric=val_pixel_aupro")) is None
        assert "the sweeper sees a failed trial" in caplog.text
    monkeypatch.setattr(entry, "_is_multirun", lambda: False)
    ran = []
    monkeypatch.setattr(adtrain.run, "run", lambda cfg: ran.append(1) or dict(RESULTS))
    with pytest.raises(SystemExit) as ex:
        main(fast_cfg("optimized_metric=image_auroc"))
    assert ex.value.code == 2 and not ran  # refused before anything runs
    assert "optimized_metric" in capsys.readouterr().err


# ---------------------------------------------------------------- the hparams_search configs


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("method", ["dfm", "patchcore", "stfpm"])
def test_hparams_search_configs_search_real_keys_on_validation(method):
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from optuna.distributions import CategoricalDistribution, IntUniformDistribution

    cfg = _compose(f"hparams_search={method}_optuna")
    sweeper = cfg.hydra.sweeper
    assert cfg.method.name == method and cfg.test is False
    assert cfg.optimized_metric in OBJECTIVES
    check_direction(cfg.optimized_metric, sweeper.direction)
    assert "optuna" in sweeper._target_ and sweeper.n_trials == 20
    assert sweeper.sampler._target_.endswith("TPESampler") and sweeper.sampler.seed is not None
    params = {k: str(v) for k, v in sweeper.params.items()}
    assert len(params) >= 4
    for key in params:  # every searched key is one of the method's (no typo searches nothing)
        assert key.startswith("method.") and key.split(".", 1)[1] in cfg.method, key
    dists, fixed = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
    assert set(dists) == set(params) and not fixed
    for key, dist in dists.items():  # integer keys are searched as integers
        if isinstance(cfg.method[key.split(".", 1)[1]], int) and not isinstance(dist, CategoricalDistribution):
            assert isinstance(dist, IntUniformDistribution), key
    # the default config is unchanged: no search, test on
    plain = _compose()
    assert plain.test is True and "optuna" not in plain.hydra.sweeper._target_


def test_dfm_schedule_sets_the_trainer_epochs_from_the_searched_schedule():
    import optuna

    cfg = _compose("hparams_search=dfm_optuna")
    assert cfg.hydra.sweeper.custom_search_space == "adtrain.sweep.dfm_schedule"
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.suggest_int("method.rounds", 3, 3)
    trial.set_user_attr("method.stage1_epochs", 2)  # a fixed override of the command line
    dfm_schedule(cfg, trial)  # stage2_epochs from the config (its default)
    assert trial.params["method.max_epochs"] == 3 * (2 + cfg.method.stage2_epochs)
    trial = study.ask()
    trial.set_user_attr("method.max_epochs", 7)  # the user fixed it: left alone
    dfm_schedule(cfg, trial)
    assert "method.max_epochs" not in trial.params


# ---------------------------------------------------------------- the summary


def _job(sweep: Path, num: int, overrides: list[str], results: dict | None, error: str | None = None):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    if error is not None:
        (job / "error.txt").write_text(error)


def test_summary_groups_seeds_by_the_swept_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    base = {"method": "patchcore", "data": "synthetic", "category": "texture", "backbone": "resnet18"}
    # image_auroc / val_image_auroc per (ratio, seed)
    figures = {("0.02", 0): (0.6, 0.7), ("0.02", 1): (0.8, 0.9), ("1.0", 0): (0.9, 0.5), ("1.0", 1): (1.0, 0.6)}
    for num, ((ratio, seed), (test, val)) in enumerate(figures.items()):
        _job(sweep, num, ["data=synthetic", f"method.coreset_ratio={ratio}", f"seed={seed}"],
             {**base, "seed": seed, "image_auroc": test, "val_image_auroc": val, "val_normal_score": 0.1})
    _job(sweep, 4, ["data=synthetic", "method.coreset_ratio=0.5", "seed=0"], None, "ConfigError: bad")

    csv_path, md_path = summarize(sweep)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["method.coreset_ratio"] for r in rows] == ["0.02", "0.02", "1.0", "1.0", "0.5"]
    assert "data" in rows[0] and "data=synthetic" not in rows[0]  # a constant override is no column
    assert [r["val_image_auroc"] for r in rows[:4]] == ["0.7", "0.9", "0.5", "0.6"]
    assert rows[4]["error"] == "ConfigError: bad"

    md = md_path.read_text()
    means = md.split("Mean ± std over seeds (sample standard deviation, n - 1; - for one seed):")[1]
    head = next(line for line in means.splitlines() if line.startswith("| method"))
    assert "method.coreset_ratio" in head and "val_image_auroc" in head
    cols = [c.strip() for c in head.strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in means.splitlines()
            if line.startswith("| patchcore")]
    by_ratio = {r[cols.index("method.coreset_ratio")]: dict(zip(cols, r)) for r in body}
    assert set(by_ratio) == {"0.02", "1.0"}  # the error job is no group, the two ratios are not mixed
    assert by_ratio["0.02"]["n"] == "2" and by_ratio["1.0"]["n"] == "2"
    assert by_ratio["0.02"]["image_auroc"] == "0.7000 ± 0.1414"  # sample std of 0.6 and 0.8
    assert by_ratio["1.0"]["image_auroc"] == "0.9500 ± 0.0707"
    assert by_ratio["0.02"]["val_image_auroc"] == "0.8000 ± 0.1414"
    assert by_ratio["1.0"]["val_image_auroc"] == "0.5500 ± 0.0707"


def test_continual_jobs_bring_their_final_averages_and_forgetting(tmp_path):
    sweep = tmp_path / "sweep"
    base = {"method": "patchcore", "data": "synthetic", "category": "synthetic_3", "backbone": "resnet18"}
    for num, (mode, seed, fm) in enumerate([("per_task", 0, 0.0), ("per_task", 1, 0.02), ("shared", 0, 0.1), ("shared", 1, 0.2)]):
        _job(sweep, num, [f"method.continual={mode}", f"seed={seed}"],
             {**base, "seed": seed, "image_auroc": 0.9, "final_checkpoint": "tasks/2/model.ckpt",
              "summary": {"final_image_auroc": 0.9, "forgetting_image_auroc": fm}})
    csv_path, md_path = summarize(sweep)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["forgetting_image_auroc"] for r in rows] == ["0.0", "0.02", "0.1", "0.2"]
    assert "final_checkpoint" not in rows[0]  # a path, not a figure: it was a column (and a "-" mean)
    means = md_path.read_text().split("Mean ± std over seeds")[1]
    head = next(line for line in means.splitlines() if line.startswith("| method"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    body = {r[cols.index("method.continual")]: dict(zip(cols, r)) for r in
            ([c.strip() for c in line.strip("|").split("|")] for line in means.splitlines() if line.startswith("| patchcore"))}
    assert body["shared"]["forgetting_image_auroc"].startswith("0.1500 ± ")
    assert body["per_task"]["final_image_auroc"].startswith("0.9000 ± ")


def test_several_category_jobs_bring_the_mean_over_their_categories(tmp_path):
    """A job of several categories (one model, the multi-class protocol): its top-level image_auroc pools
    every category's images; the summary also carries by_category.mean's figures, averaged over seeds."""
    sweep = tmp_path / "sweep"
    base = {"method": "stfpm", "data": "synthetic", "category": ["texture", "grid"], "backbone": "resnet18"}
    for num, (seed, pooled, mean) in enumerate([(0, 0.6, 0.75), (1, 0.7, 0.85)]):
        _job(sweep, num, [f"seed={seed}"], {**base, "seed": seed, "image_auroc": pooled, "by_category": {
            "texture": {"image_auroc": mean + 0.1}, "grid": {"image_auroc": mean - 0.1},
            "mean": {"image_auroc": mean, "pixel_auroc": None}}})
    _job(sweep, 2, ["seed=2"], {**base, "category": "texture", "seed": 2, "image_auroc": 0.9})  # one category
    csv_path, md_path = summarize(sweep)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["image_auroc"] for r in rows] == ["0.6", "0.7", "0.9"]
    assert [r["category_mean_image_auroc"] for r in rows] == ["0.75", "0.85", ""]
    assert "category_mean_pixel_auroc" in rows[0] and "category_mean_image_ap" not in rows[0]
    means = md_path.read_text().split("Mean ± std over seeds")[1]
    head = next(line for line in means.splitlines() if line.startswith("| method"))
    cols = [c.strip() for c in head.strip("|").split("|")]
    row = next(dict(zip(cols, [c.strip() for c in line.strip("|").split("|")])) for line in means.splitlines()
               if line.startswith("| stfpm") and "| 2 |" in line)
    assert row["category_mean_image_auroc"].startswith("0.8000 ± ") and row["image_auroc"].startswith("0.6500 ± ")


def test_nested_job_folders_and_failed_jobs_keep_their_key_columns(tmp_path):
    """``hydra.sweep.subdir=${data.category}/seed${seed}`` puts jobs two levels down: they are still
    summarised, named by their path; a failed job's method, category and seed come from its config."""
    sweep = tmp_path / "sweep"
    base = {"method": "patchcore", "data": "synthetic", "backbone": "resnet18", "image_auroc": 0.9}
    for cat in ("texture", "grid"):
        for seed in (0, 1):
            _job(sweep, f"{cat}/seed{seed}", [f"data.category={cat}", f"seed={seed}"], {**base, "category": cat, "seed": seed})
    bad = sweep / "bogus" / "seed1"
    _job(sweep, "bogus/seed1", ["data.category=bogus", "seed=1"], None, "DataError: no such category\nmore")
    (bad / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"method": {"name": "patchcore"}, "data": {"name": "synthetic", "category": "bogus"},
         "backbone": {"name": "resnet18.tv_in1k"}, "seed": 1})))
    rows = list(csv.DictReader(open(summarize(sweep)[0])))
    assert sorted(r["job"] for r in rows) == ["bogus/seed1", "grid/seed0", "grid/seed1", "texture/seed0", "texture/seed1"]
    failed = next(r for r in rows if r["job"] == "bogus/seed1")
    assert (failed["category"], failed["seed"], failed["backbone"]) == ("bogus", "1", "resnet18")
    assert failed["error"] == "DataError: no such category"


def test_a_sweep_whose_every_job_failed_exits_with_an_error(tmp_path, capsys):
    """Each job of experiment=patchcore_mvtec without MVTec on disk failed alone, as it should, but the
    sweep then exited 0, as if it had worked; with one job finished it still does."""
    from adtrain.sweep import SweepSummary

    sweep = tmp_path / "sweep"
    for i in range(2):
        _job(sweep, str(i), [f"seed={i}"], None, "DataError: /data/mvtec: not found\nmore")
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with pytest.raises(SystemExit) as e:
        SweepSummary().on_multirun_end(config)
    assert e.value.code == 1 and "every job of the sweep failed (2; the first: 0: DataError" in capsys.readouterr().err
    _job(sweep, "2", ["seed=2"], {"method": "patchcore", "data": "synthetic", "backbone": "resnet18", "image_auroc": 0.9})
    SweepSummary().on_multirun_end(config)  # one job finished: no exit


def test_a_job_with_an_unreadable_results_json_is_a_failed_row_naming_it(tmp_path):
    """A job's results.json cut short (a job killed while writing it, a damaged copy) fails that job's
    row, named, as a job with error.txt does; the summary of the others is still written."""
    sweep = tmp_path / "sweep"
    base = {"method": "patchcore", "data": "synthetic", "category": "texture", "backbone": "resnet18"}
    for seed in (0, 1):
        _job(sweep, seed, [f"seed={seed}"], {**base, "seed": seed, "image_auroc": 0.8 + seed / 10})
    _job(sweep, 2, ["seed=2"], {**base, "seed": 2, "image_auroc": 0.5})
    cut = sweep / "2" / "results.json"
    cut.write_text(cut.read_text()[:30])
    (sweep / "2" / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"method": {"name": "patchcore"}, "data": {"name": "synthetic", "category": "texture"},
         "backbone": {"name": "resnet18.tv_in1k"}, "seed": 2})))
    csv_path, md_path = summarize(sweep)
    rows = list(csv.DictReader(open(csv_path)))
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    assert [r["error"] for r in rows[:2]] == ["", ""] and rows[1]["image_auroc"] == "0.9"
    failed = rows[2]
    assert failed["error"].startswith(f"DataError: {cut}: unreadable results.json"), failed["error"]
    assert (failed["method"], failed["category"], failed["seed"], failed["image_auroc"]) == ("patchcore", "texture", "2", "")
    assert str(cut) in md_path.read_text()
    means = md_path.read_text().split("Mean ± std over seeds")[1]
    assert "| 2 |" in means and "0.8500 ± " in means  # the two whole jobs, the failed one left out


def test_swept_keys_are_those_that_vary():
    jobs = [{"a": "1", "b": "x", "seed": "0"}, {"a": "2", "b": "x", "seed": "1"}, {"a": "2", "b": "x", "c": "y"}]
    assert swept_keys(jobs) == ["a", "c"]  # seed is a key column already; b is constant
    assert swept_keys([]) == []


# ---------------------------------------------------------------- a real Optuna search


def _tree_with_unreadable_test_set(root: Path) -> Path:
    """An MVTec-layout tree whose test images and masks are not images: opening one fails."""
    from adtrain.data.testing import write_mvtec_tree

    write_mvtec_tree(root, "widget", n_train=20, n_test_good=3, defects={"crack": 3}, size=64)
    broken = [p for d in ("test", "ground_truth") for p in (root / "widget" / d).rglob("*.png")]
    for p in broken:
        p.write_bytes(b"not an image: a sweep job must never open the test set")
    assert len(broken) == 9
    return root


def test_optuna_search_optimises_validation_without_opening_the_test_set(tmp_path):
    from adtrain.data.image_io import read_image
    from tests.conftest import FAST_BASE

    root = _tree_with_unreadable_test_set(tmp_path / "mvtec")
    with pytest.raises(DataError):  # what any test-set read would hit
        read_image(next((root / "widget" / "test").rglob("*.png")))
    sweep = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = ["hparams_search=patchcore_optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
            *FAST_BASE, "data=mvtec", f"data.root={root}", "data.category=widget", "data.num_workers=0",
            "method.memory.backend=torch", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run([sys.executable, "-m", "adtrain", "-m", *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]

    best = OmegaConf.load(sweep / "optimization_results.yaml")
    searched = {"method.coreset_ratio", "method.num_neighbors", "method.pool_size", "method.layers"}
    assert set(best.best_params) == searched
    jobs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
    assert not list(sweep.glob("*/error.txt"))
    for res in jobs:
        assert res["image_auroc"] is None and res["pixel_auroc"] is None  # test=false: no test figure
        assert 0.0 <= res["val_image_auroc"] <= 1.0
    assert not list(sweep.glob("*/scores.csv")) and not list(sweep.glob("*/heatmaps/*.png"))
    # the sweeper saw the validation AUROC: the best value is the best job's, not a test figure
    assert math.isclose(best.best_value, max(r["val_image_auroc"] for r in jobs))
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 3 and searched <= set(rows[0])
    assert {r["method.pool_size"] for r in rows} <= {"1", "3", "5"}
    assert all(float(r["method.num_neighbors"]).is_integer() for r in rows)


def test_a_stopped_sweep_resumes_keeping_finished_jobs(tmp_path):
    """`-m ... resume=true` (what the refusal of an earlier sweep's folder offers): a finished job
    is kept as it is (its objective read back, nothing run), a begun one (here: finished, but its
    results.json damaged, moved aside) resumes from its checkpoints, one that never began runs; the
    summary holds all three. Another sweep's job in a
    folder (a changed swept value) is refused, not mixed in."""
    from tests.conftest import FAST

    sweep = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = [*FAST, "method=patchcore", "output.heatmaps=0", "data.num_train=16",
            "optimized_metric=val_normal_score", f"hydra.sweep.dir={sweep}"]

    def sweep_run(*extra, seeds="seed=0,1,2"):
        return subprocess.run([sys.executable, "-m", "adtrain", "-m", *args, seeds, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    p = sweep_run()
    assert p.returncode == 0, p.stderr[-3000:]
    first = {i: json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)}
    kept_at = (sweep / "0" / "results.json").stat().st_mtime_ns
    (sweep / "1" / "results.json").write_text('{"image_auroc": 0.9')  # a damaged copy: begun, stopped after its fit
    for p in (sweep / "2").iterdir():  # never begun: Hydra's record alone
        if p.name != ".hydra":
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    p = sweep_run()  # without resume=true: refused at the start, nothing touched
    assert p.returncode == 2 and "hydra.sweep.dir" in p.stderr
    p = sweep_run("resume=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == kept_at
    assert not list(sweep.glob("*/error.txt"))
    assert "results.json cannot be read (not JSON" in p.stdout + p.stderr  # said, and kept to be looked at
    assert (sweep / "1" / "results.damaged.json").read_text() == '{"image_auroc": 0.9'
    for i in range(3):
        again = json.loads((sweep / str(i) / "results.json").read_text())
        assert again["val_normal_score"] == pytest.approx(first[i]["val_normal_score"], rel=1e-6), i
        assert again["image_auroc"] == pytest.approx(first[i]["image_auroc"], rel=1e-6), i
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["seed"] for r in rows) == ["0", "1", "2"]

    # job 0 (finished) and job 1 (begun: its results.json gone) would each be another job: both refused in
    # one resumed sweep (a refused job does not stop the sweep), their results and records kept or put back
    (sweep / "1" / "results.json").unlink()
    p = sweep_run("resume=true", seeds="seed=5,6,2")
    said = p.stdout + p.stderr
    assert said.count("holds another job of a sweep") >= 2, said[-3000:]
    assert f"{sweep / '0'} holds another job of a sweep" in said and f"{sweep / '1'} holds another job of a sweep" in said
    assert (sweep / "0" / "results.json").stat().st_mtime_ns == kept_at
    record = list(OmegaConf.load(sweep / "0" / ".hydra" / "overrides.yaml"))
    assert "seed=0" in record and "seed=5" not in record  # its record put back
    assert f"hydra.run.dir={sweep / '1'}" not in said, said[-3000:]
    record = list(OmegaConf.load(sweep / "1" / ".hydra" / "overrides.yaml"))
    assert "seed=1" in record and "seed=6" not in record
    assert OmegaConf.load(sweep / "1" / "config.yaml").seed == 1 and not (sweep / "1" / "results.json").exists()
    assert not (sweep / "1" / "error.txt").exists() and "the fitted model is kept" not in said  # nothing written into it
    assert not list(sweep.glob("**/.hydra-before-resume"))
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert sorted(r["seed"] for r in rows) == ["0", "2"]  # the folders' own jobs (not 5, 6); job 1 unfinished


def test_an_overwritten_sweep_summarises_only_its_own_jobs(tmp_path):
    """The command line of the report: a sweep of seeds 0, 1 then, into its folder with overwrite=true,
    one of seed 5 (another epoch count). Job 1 of the first sweep used to stay, summarised with the
    new sweep's job (and in its mean over seeds)."""
    from tests.conftest import FAST

    sweep = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = [*FAST, "method=patchcore", "output.heatmaps=0", "data.num_train=16",
            "optimized_metric=val_normal_score", f"hydra.sweep.dir={sweep}"]

    def sweep_run(*extra):
        return subprocess.run([sys.executable, "-m", "adtrain", "-m", *args, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    p = sweep_run("seed=0,1", "trainer.max_epochs=2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list(csv.DictReader(open(sweep / "summary.csv")))) == 2
    p = sweep_run("seed=5", "overwrite=true")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [(r["job"], r["seed"]) for r in rows] == [("0", "5")]
    assert not (sweep / "1").exists()
    assert "Mean ± std" not in (sweep / "summary.md").read_text()  # one seed: nothing averaged with a stale job


def test_a_resumed_sweep_job_with_a_damaged_record(tmp_path):
    """adtrain.resume.sweep_job on a finished job's folder: an unreadable results.json is moved aside and
    the job resumes (its fit is on disk); an unreadable config.yaml (is it this very job?) is refused
    naming the file and the way to run that job alone again, with the damaged files left as they were."""
    from adtrain.resume import DAMAGED_RESULTS, sweep_job
    from tests.conftest import FAST, compose

    cfg = compose(*FAST, "method=patchcore", "resume=true")
    job = tmp_path / "3"
    job.mkdir()
    OmegaConf.save(cfg, job / "config.yaml")
    (job / "results.json").write_text("[1, 2]")  # valid JSON, not a run's results
    done, resumed = sweep_job(cfg, job, keys=["method"])
    assert done is None and resumed.resume is True and resumed.method.coreset_ratio == cfg.method.coreset_ratio
    assert (job / DAMAGED_RESULTS).read_text() == "[1, 2]" and not (job / "results.json").exists()

    (job / "results.json").write_text('{"image_auroc": 0.5}')
    (job / "config.yaml").write_text("method: [unclosed")
    with pytest.raises(ConfigError, match=r"config.yaml of a finished job cannot be read \(.*move .*3 away") as err:
        sweep_job(cfg, job, keys=["method"])
    assert err.value.key == "resume" and "overwrite=true" in str(err.value)
    assert (job / "results.json").read_text() == '{"image_auroc": 0.5}'
    (job / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # readable again: finished, its results kept
    assert sweep_job(cfg, job, keys=["method"]) == ({"image_auroc": 0.5}, cfg)


def test_a_sweep_resumed_without_one_of_its_overrides_refuses_its_finished_jobs(tmp_path):
    """The resumed command lost `data.num_test_anomalous=6`: the finished job was kept as this sweep's and
    its other jobs ran at the default, one summary of two configurations. The job's own record names the key."""
    from adtrain.resume import sweep_job
    from adtrain.sweep_dir import PRIOR_RECORD
    from tests.conftest import FAST, compose

    old = compose(*FAST, "method=patchcore", "data.num_test_anomalous=6", "seed=0")
    job = tmp_path / "0"
    (job / PRIOR_RECORD).mkdir(parents=True)
    OmegaConf.save(old, job / "config.yaml")
    OmegaConf.save(OmegaConf.create([*FAST, "method=patchcore", "data.num_test_anomalous=6", "seed=0"]),
                   job / PRIOR_RECORD / "overrides.yaml")
    (job / "results.json").write_text('{"image_auroc": 0.5}')
    new = compose(*FAST, "method=patchcore", "seed=0", "resume=true")
    with pytest.raises(ConfigError, match=r"holds another job of a sweep \(data.num_test_anomalous: 6 -> 8"):
        sweep_job(new, job, keys=["method", "seed", "resume"])
    same = compose(*FAST, "method=patchcore", "data.num_test_anomalous=6", "seed=0", "resume=true")
    assert sweep_job(same, job, keys=["method", "data.num_test_anomalous", "seed", "resume"])[0] == {"image_auroc": 0.5}


def test_an_optuna_sweep_whose_every_trial_fails_still_writes_its_summary(tmp_path):
    """Optuna raises "No trials are completed yet" after the last trial: Hydra never calls on_multirun_end,
    so there was a 25-line traceback and no summary. Now the summary (each trial's error) and one line."""
    from tests.conftest import FAST_BASE

    sweep = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = [*FAST_BASE, "hparams_search=patchcore_optuna", "hydra.sweeper.n_trials=2", "data=mvtec",
            f"data.root={tmp_path / 'nowhere'}", "data.category=bottle", f"hydra.sweep.dir={sweep}"]
    p = subprocess.run([sys.executable, "-m", "adtrain", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith("adtrain: error: the sweep stopped (ValueError: No trials are completed yet.)"), line
    assert f"hydra.sweep.dir={sweep} resume=true" in line
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 2 and all("root folder not found" in r["error"] for r in rows)
    fd = os.open(sweep / ".adtrain.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the folder is free again: its lock held by no one
    finally:
        os.close(fd)


def test_a_grid_sweep_is_not_refused_over_an_objective_it_never_reads():
    """`-m ... data.val_anomalies=null seed=0,1` was refused ("optimized_metric=val_image_auroc needs
    synthetic anomalies") though the grid sweeper reads no objective; Optuna's sweep still is."""
    from adtrain.sweep import check_objective_exists, reads_objective

    grid = _compose("data.val_anomalies=null")
    assert not reads_objective(grid)
    check_objective_exists(grid)
    check_objective_exists(_compose("data.val_split=0"))
    searched = _compose("hparams_search=patchcore_optuna", "data.val_anomalies=null")
    assert reads_objective(searched)
    with pytest.raises(ConfigError, match="needs synthetic anomalies"):
        check_objective_exists(searched)
    with pytest.raises(ConfigError, match="holds out no training normal"):
        check_objective_exists(_compose("hparams_search=patchcore_optuna", "data.val_split=0"))
