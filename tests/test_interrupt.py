"""A KeyboardInterrupt raised into the library (no signal handlers installed, as when
train_and_evaluate is called from a notebook): a message that says truthfully what was saved.
main.py's signal handling in every phase is tests/test_interrupt_phases.py's subject."""

import os

import pytest

from configs import smoke
from larvseg_jax import sharding, train


def _interrupt_at(monkeypatch, call):
    real, calls = sharding.host_batch_to_global, []

    def interrupted(batch, mesh):
        calls.append(len(calls))
        if calls[-1] == call:
            raise KeyboardInterrupt
        return real(batch, mesh)

    monkeypatch.setattr(sharding, "host_batch_to_global", interrupted)


def test_interrupt_before_the_first_step_saves_nothing_and_says_so(tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 0)
    with pytest.raises(train.Interrupted) as info:
        train.train_and_evaluate(smoke.get_config(), str(tmp_path), do_eval=False)
    assert (info.value.step, info.value.wrote, info.value.latest) == (0, False, None)
    assert not os.listdir(tmp_path / "checkpoints")
    assert "nothing was saved" in info.value.message()


def test_interrupt_right_after_a_resume_points_at_the_existing_checkpoint(tmp_path, monkeypatch):
    train.train_and_evaluate(smoke.get_config(), str(tmp_path), do_eval=False, stop_at=3)
    _interrupt_at(monkeypatch, 0)
    with pytest.raises(train.Interrupted) as info:
        train.train_and_evaluate(smoke.get_config(), str(tmp_path), do_eval=False)
    assert (info.value.step, info.value.wrote, info.value.latest) == (3, False, 3)
    assert "resumes from the checkpoint of step 3" in info.value.message()
