"""End to end through main.py on the smoke config: train, checkpoint, TensorBoard, eval JSON,
resume, eval on another device count, and one-line errors for user mistakes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, devices=8, check=True):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/smoke.py", *args],
        check=False,  # the caller asserts on the return code and prints stderr
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    proc = run_main("--workdir", str(workdir))
    return workdir, proc


def test_train_and_eval_writes_checkpoints_tensorboard_and_json(trained):
    workdir, proc = trained
    assert "mIoU" in proc.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    report = json.loads((workdir / "eval" / "step_6.json").read_text())
    for key in (
        "step",
        "miou",
        "miou_base",
        "miou_novel",
        "pixel_acc",
        "per_class_iou",
        "num_images",
    ):
        assert key in report
    assert report["step"] == 6 and report["num_images"] == 4
    assert "ETA" in proc.stderr and "img/s" in proc.stderr

    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(workdir / "tensorboard"), size_guidance={"tensors": 0, "images": 0}
    )
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {
        "train/loss",
        "train/lr",
        "train/images_per_sec",
        "eval/miou",
        "eval/miou_novel",
    } <= tags
    assert any(t.startswith("train/loss_syn_") for t in tags)
    assert any(t.startswith("eval/input_gt_prediction") for t in acc.Tags()["images"])


def test_rerun_resumes_and_eval_restores_on_one_device(trained):
    workdir, _ = trained
    again = run_main("--workdir", str(workdir))
    assert "resuming from" in again.stderr and "step 1/" not in again.stderr
    one = run_main("--workdir", str(workdir), "--mode", "eval", devices=1)
    eight = json.loads((workdir / "eval" / "step_6.json").read_text())
    assert f"mIoU {eight['miou']:.2f}" in one.stdout  # same numbers on 1 device


def test_config_typo_is_one_line_error(tmp_path):
    proc = run_main("--workdir", str(tmp_path), "--config.train.totl_steps=3", check=False)
    assert proc.returncode != 0 and "totl_steps" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_dataset_is_one_line_error(tmp_path):
    proc = run_main("--workdir", str(tmp_path), "--config.data.eval_source=syn_nope", check=False)
    assert proc.returncode == 1 and "syn_nope" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_workdir_is_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = run_main("--workdir", str(blocker / "sub"), check=False)
    assert proc.returncode == 1 and "not writable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_larvseg_run_writes_attention_panels(tmp_path):
    run_main(
        "--workdir",
        str(tmp_path),
        "--config.ca.enabled=True",
        "--config.ca.memory_size=1",
        "--config.ca.topk=4",
        "--config.ca.warm_up=0",
    )
    assert (tmp_path / "eval" / "ca_attention_step_6.png").stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "step_6.json").read_text())["num_images"] == 4
