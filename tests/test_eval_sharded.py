"""Evaluation over several devices and processes gives one device's results bit for bit; the
progress bar, the frequency counts and the bucket config."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from larvseg_jax import evaluate, experiment, train_eval
from larvseg_jax.data import sources
from larvseg_jax.errors import ConfigError
from tests.test_evaluate import EVAL_ARGS, fake_predict

ROOT = pathlib.Path(__file__).resolve().parents[1]


def make_dataset(num, seed=0):
    rng = np.random.default_rng(seed)
    dataset = []
    for i in range(num):
        hw = (24 + 8 * (i % 3), 24 + 8 * (i % 2))
        hw0 = (hw[0] + 6, hw[1] + 2 * i)
        dataset.append(
            {
                "image": rng.normal(size=(*hw, 3)).astype(np.float32),
                "label": rng.integers(-1, 4, size=hw0).astype(np.int32),
                "raw": rng.integers(0, 256, size=(*hw0, 3), dtype=np.uint8),
                "id": f"im{i}",
            }
        )
    return dataset


def evaluate_on(tmp_path, dataset, name, **kwargs):
    kwargs.setdefault("predict_fn", fake_predict)
    out = evaluate.run_evaluation(
        dataset=dataset,
        **EVAL_ARGS,
        step=1,
        out_dir=tmp_path / name,
        progress=False,
        **kwargs,
    )
    return out.pop("panels"), out


def test_round_robin_over_devices_matches_one_device(tmp_path):
    dataset = make_dataset(7)
    devices = jax.local_devices()[:3]
    seen = []

    def recording(images):
        seen.append(images.device)
        return fake_predict(images)

    panels, report = evaluate_on(
        tmp_path, dataset, "three", predict_fn=recording, devices=devices, num_panels=7
    )
    assert set(seen) == set(devices)  # window batches ran on each device
    panels1, report1 = evaluate_on(
        tmp_path, dataset, "one", devices=jax.local_devices()[:1], num_panels=7
    )
    assert report == report1
    for a, b in zip(panels, panels1, strict=True):
        np.testing.assert_array_equal(a, b)


def test_processes_share_images_and_sum_histograms_exactly(tmp_path, monkeypatch):
    """Process p of 2 takes images p, p + 2, ...; process 0's report is one process's."""
    dataset = make_dataset(5, seed=1)
    panels1, want = evaluate_on(tmp_path, dataset, "single", num_panels=5)
    gathered = {}

    def fake_gather(pid):
        def gather(x):
            gathered[pid] = x
            return np.stack([gathered.get(p, np.zeros_like(x)) for p in (0, 1)])

        return gather

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    reports = {}
    for pid in (1, 0):  # process 0 last, so its gather sees both shares
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        monkeypatch.setattr(evaluate, "_allgather_int64", fake_gather(pid))
        reports[pid] = evaluate_on(tmp_path, dataset, f"p{pid}", num_panels=5)
    assert gathered[0][-1] == 3 and gathered[1][-1] == 2  # images per process
    panels, report = reports[0]
    assert report == want
    assert os.listdir(tmp_path / "p0") == ["step_1.json"] and not (tmp_path / "p1").exists()
    for got, i in zip(panels, (0, 2, 4), strict=True):  # process 0's own images
        np.testing.assert_array_equal(got, panels1[i])


def test_allgather_keeps_int64_beyond_int32():
    x = np.array([[2**40 + 3, -5], [2**31, 7]], np.int64)
    got = evaluate._allgather_int64(x)
    assert got.dtype == np.int64 and got.shape == (1, 2, 2)
    np.testing.assert_array_equal(got[0], x)


def test_frequency_counts_name_their_source_or_why_not(tmp_path):
    data_dir = str(tmp_path)
    source, counts, note = train_eval.frequency_counts(data_dir, "syn_eval")
    assert (source, counts) == ("syn_weak", None) and "'syn_weak' is not on disk" in note
    where = sources.source_dir(data_dir, "syn_weak")
    os.makedirs(where)
    meta = {"class_names": ["sky", "boat", "sky"]}
    with open(os.path.join(where, "metadata.json"), "w") as f:
        json.dump(meta, f)
    source, counts, note = train_eval.frequency_counts(data_dir, "syn_eval")
    assert counts is None and "no per-class image counts" in note
    meta["class_image_counts"] = {"train": [3, 4, 5]}
    with open(os.path.join(where, "metadata.json"), "w") as f:
        json.dump(meta, f)
    assert train_eval.frequency_counts(data_dir, "syn_eval") == (
        "syn_weak",
        {"sky": 8, "boat": 4},
        "",
    )
    source, counts, note = train_eval.frequency_counts(data_dir, "syn_seg")
    assert (source, counts) == ("", None) and "no frequency source" in note


@pytest.mark.parametrize("buckets", [(100, 10), (-1, 10), (10,), (1.5, 10)])
def test_bad_frequency_buckets_name_their_key(buckets):
    cfg = base.get_config()
    cfg.eval.frequency_buckets = buckets
    with pytest.raises(ConfigError, match=r"eval.frequency_buckets=.* must be two ints"):
        experiment.validate(cfg)


def test_loop_settings_carry_the_buckets():
    cfg = base.get_config()
    assert experiment.loop_settings(cfg).eval_frequency_buckets == (10, 100)


# Runs run_eval on the smoke model (random init) and data; saves the report, the TensorBoard
# scalars and every predicted mask, in image order.
WORKER = """
import json, sys
import jax
import numpy as np
from configs import smoke
from larvseg_jax import evaluate, experiment, train, train_eval

workdir, out = sys.argv[1:]
preds, histograms = [], evaluate.class_histograms

def recording(pred, gt, num_classes):
    preds.append(np.asarray(pred))
    return histograms(pred, gt, num_classes)

class Writer:
    scalars = {}
    def write_scalars(self, step, scalars):
        self.scalars.update(scalars)
    def write_images(self, step, images):
        pass
    def flush(self):
        pass

evaluate.class_histograms = recording
setup = experiment.build_setup(smoke.get_config(), workdir)
report = train_eval.run_eval(setup, train.initial_state(setup), 0, Writer())
with open(out + ".json", "w") as f:
    json.dump({"devices": jax.local_device_count(), "report": report, "tb": Writer.scalars}, f)
np.savez(out + ".npz", *preds)
"""


def run_worker(tmp_path, devices):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    out = tmp_path / f"d{devices}"
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path / f"w{devices}"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["devices"] == devices
    with np.load(out.with_suffix(".npz")) as preds:
        return saved, [preds[f"arr_{i}"] for i in range(len(preds.files))]


def test_eight_devices_give_one_devices_results_bit_for_bit(tmp_path):
    """The tiny model on the synthetic eval set, in fresh processes with 8 and 1 CPU devices."""
    eight, preds8 = run_worker(tmp_path, 8)
    one, preds1 = run_worker(tmp_path, 1)
    assert len(preds8) == len(preds1) == eight["report"]["num_images"] == 4
    for a, b in zip(preds8, preds1, strict=True):
        np.testing.assert_array_equal(a, b)
    assert eight["report"] == one["report"] and eight["tb"] == one["tb"]
    freq = eight["report"]["frequency"]
    assert freq["source"] == "syn_weak" and freq["thresholds"] == [10, 100]
    assert sum(freq[f"num_{b}"] for b in evaluate.BUCKETS) == eight["report"]["num_classes"]
    for key in ("miou", "miou_base", "miou_novel", "hiou"):
        assert (f"eval/{key}" in eight["tb"]) == (eight["report"][key] is not None)
    for b in evaluate.BUCKETS:
        assert (f"eval/miou_{b}" in eight["tb"]) == (freq[f"miou_{b}"] is not None)
