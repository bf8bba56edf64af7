"""End to end through main.py on the smoke config: train, checkpoint, TensorBoard, eval JSON,
resume, eval on another device count, and one-line errors for user mistakes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, devices=8, check=True, config="configs/smoke.py", env=None):
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {})
    )
    config_args = ["--config", config] if config else []
    proc = subprocess.run(
        [sys.executable, "main.py", *config_args, *args],
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


def test_rerun_of_a_finished_run_says_so_and_eval_restores_on_one_device(trained):
    workdir, _ = trained
    events = sorted(os.listdir(workdir / "tensorboard"))
    again = run_main("--workdir", str(workdir))
    assert "run complete" in again.stderr and "step 1/" not in again.stderr
    assert "mIoU" in again.stdout  # the finished run's result, read back
    assert sorted(os.listdir(workdir / "tensorboard")) == events  # no new event file
    one = run_main("--workdir", str(workdir), "--mode", "eval", devices=1)
    eight = json.loads((workdir / "eval" / "step_6.json").read_text())
    assert f"mIoU {eight['miou']:.2f}" in one.stdout  # same numbers on 1 device


def test_log_is_clean(trained):
    _, proc = trained
    for noise in ("libtpu", "Using custom data configuration", "OpenCV", "Traceback"):
        assert noise not in proc.stderr
    assert proc.stdout.count("mIoU") == 1 and proc.stderr.count("mIoU") == 1


def test_synthetic_world_is_generated_once_and_shared(trained, tmp_path):
    cache = pathlib.Path(os.environ["LARVSEG_CACHE"])
    worlds = [p for p in cache.iterdir() if p.name.startswith("synthetic_v")]
    run_main("--workdir", str(tmp_path), "--mode", "train", "--config.train.total_steps=1")
    assert [p for p in cache.iterdir() if p.name.startswith("synthetic_v")] == worlds
    assert not (tmp_path / "data").exists()


def test_help_lists_configs_and_keys():
    proc = run_main("--help", config=None)
    assert proc.returncode == 0
    assert "configs/synthetic_larvseg.py" in proc.stdout and "Table 3 LarvSeg" in proc.stdout
    assert "train.total_steps" in proc.stdout and "model.pretrained" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir", "w"], "--config is required"),
        (
            ["--config", "configs/nope.py", "--workdir", "w"],
            "config file 'configs/nope.py' not found",
        ),
        (
            ["--config", "configs/synthetic_larvseg.py:foo=1", "--workdir", "w"],
            "configs/synthetic_larvseg.py: this config takes no argument (got 'foo=1')",
        ),
        (
            ["--config", "configs/larvseg_c171_wa150.py:topk=x", "--workdir", "w"],
            "config argument topk='x' must be a int",
        ),
        (["--config", "configs/smoke.py"], "--workdir is required"),
    ],
)
def test_command_line_mistakes_are_one_line(args, message):
    proc = run_main(*args, config=None, check=False)
    assert proc.returncode == 2 and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 3


def test_bad_value_is_reported_before_any_data_is_made(tmp_path):
    cache = tmp_path / "cache"
    proc = run_main(
        "--workdir",
        str(tmp_path / "w"),
        "--config.model.variant=huge",
        check=False,
        env={"LARVSEG_CACHE": str(cache)},
    )
    assert proc.returncode == 1 and "model.variant='huge' is unknown" in proc.stderr
    assert "Traceback" not in proc.stderr and not cache.exists()


def test_paper_config_without_data_names_what_to_do(tmp_path):
    proc = run_main(
        "--workdir",
        str(tmp_path / "w"),
        f"--config.data.dir={tmp_path}",
        config="configs/baseline_c171_wa150.py",
        devices=8,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "'wa150' not found" in proc.stderr or "'c171' not found" in proc.stderr
    assert "<converter>" not in proc.stderr


def test_config_typo_is_one_line_error(tmp_path):
    proc = run_main("--workdir", str(tmp_path), "--config.train.totl_steps=3", check=False)
    assert proc.returncode == 2
    assert "--config.train.totl_steps: no such key; did you mean train.total_steps?" in proc.stderr
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


def test_larvseg_run_writes_attention_panels(smoke_ca_run):
    assert (smoke_ca_run / "eval" / "ca_attention_step_6.png").stat().st_size > 0
    assert json.loads((smoke_ca_run / "eval" / "step_6.json").read_text())["num_images"] == 4


def test_library_bugs_keep_their_traceback_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """Only UserError becomes one line; any other exception is a bug and propagates."""
    import main
    from larvseg_jax import train
    from larvseg_jax.errors import ConfigError

    main.FLAGS(["main.py", "--config", "configs/smoke.py", "--workdir", str(tmp_path)])
    monkeypatch.chdir(ROOT)

    def bug(*args, **kwargs):
        raise ValueError("an internal shape bug")

    monkeypatch.setattr(train, "train_and_evaluate", bug)
    with pytest.raises(ValueError, match="internal shape bug"):
        main.main(["main.py"])

    def mistake(*args, **kwargs):
        raise ConfigError("config data.dir is empty: point it at ...")

    monkeypatch.setattr(train, "train_and_evaluate", mistake)
    with pytest.raises(SystemExit) as exit_info:
        main.main(["main.py"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: config data.dir is empty") and len(err.splitlines()) == 1


def test_summary_line_shows_hiou_and_survives_empty_means():
    import main

    report = {"step": 8, "miou": 50.0, "miou_base": 80.0, "miou_novel": None, "hiou": None}
    line = main.summary_line({**report, "num_images": 4})
    assert line == "step 8: mIoU 50.00  base 80.00  novel n/a  hIoU n/a  (4 images)"


def test_missing_data_dir_and_missing_checkpoint_are_one_line_errors(tmp_path):
    proc = run_main(
        "--workdir",
        str(tmp_path / "run"),
        f"--config.data.dir={tmp_path / 'nowhere'}",
        config="configs/baseline_c171_wa150.py",
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"data.dir='{tmp_path / 'nowhere'}' does not exist" in proc.stderr
    proc = run_main("--workdir", str(tmp_path / "fresh"), "--mode", "eval", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no checkpoint in" in proc.stderr and "train first" in proc.stderr
