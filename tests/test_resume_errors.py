"""What a run that cannot be resumed says: each message names the file and the one way on
(overwrite=true), never a key that resume would refuse in its turn."""

from __future__ import annotations

import pytest

from adtrain.errors import ConfigError, DataError, TrainingError


def test_a_lost_or_broken_continual_state_points_to_overwrite(tmp_path):
    from adtrain.continual.state import ContinualState

    (tmp_path / "tasks" / "0").mkdir(parents=True)  # a begun sequence whose state file was deleted
    with pytest.raises(ConfigError, match=r"tasks/ but no continual_state.json.*overwrite=true"):
        ContinualState.load(tmp_path)
    (tmp_path / "continual_state.json").write_text("{not json")
    with pytest.raises(DataError, match=r"continual_state.json.*unreadable.*overwrite=true") as err:
        ContinualState.load(tmp_path)
    assert "delete it" not in str(err.value)  # deleting it led only to the message above


def test_an_empty_config_yaml_is_named_not_diffed(tmp_path):
    from adtrain.resume import stored_config

    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"config.yaml: not a run config.*overwrite=true"):
        stored_config(tmp_path)


def test_a_missing_selected_checkpoint_points_to_overwrite_not_to_another_monitor(tmp_path):
    from adtrain.selection import Selection

    sel = Selection("normal_map_mean", tmp_path)
    with pytest.raises(TrainingError, match=r"best.ckpt.*missing.*overwrite=true") as err:
        sel.restore(None, {"selected": "epoch"})
    assert "selection.monitor" not in str(err.value)  # resume refuses a changed monitor
