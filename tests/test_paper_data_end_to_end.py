"""Every paper config trains and evaluates on data written by `data_prep.prepare`.

Miniatures of the four downloads (tests/data/layouts.py: real layouts, encodings, class ids and
wnids, with grayscale, CMYK and corrupt files) go through the real command line; then each
paper config runs two steps (six of the eleven only with --runslow; the rest cover every source,
eval set and head variant) with a micro ViT and small crops (--mode train_and_eval in-process)
and its eval JSON must hold base/novel means over the paper's class lists.
"""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from larvseg_jax import train
from larvseg_jax.data import catalog
from tests.data import layouts

REPO = pathlib.Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted(
    p.stem
    for p in (REPO / "configs").glob("*.py")
    if p.stem.startswith(("baseline_", "larvseg_", "supervised_"))
)
# In the default suite: one config per training source, eval set and head variant (CA,
# baseline, single-image, supervised); the other six run with --runslow.
COVERING = {
    "larvseg_c171_wa150_i124",
    "larvseg_c171_wa847_i585",
    "baseline_c171_i11k",
    "larvseg_single_image_c171_wa150",
    "supervised_a150",
}
SPLITS = {"a150": (58, 92), "a847": (92, 755), "a585": None}


def _ids(names, wanted):
    return [names.index(n) for n in wanted]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Miniature downloads -> `python -m data_prep.prepare` -> the data dir."""
    src = tmp_path_factory.mktemp("downloads")
    a150, a847, a585 = (catalog.class_names(n) for n in ("a150", "a847", "a585"))
    # Validation images carry base and novel classes of every evaluation set (SPEC 5.3 rule 2):
    # A150 wall/sky base, windowpane/painting novel; A585 its first base and novel names.
    ade_ids = [i + 1 for i in _ids(a150, ["wall", "windowpane", "sky", "painting"])]
    full_ids = _ids(a847, ["wall", "windowpane", "car", a585[0], a585[1], "sky"])
    wnids = [w for s in ("i124", "i585", "i11k") for w in catalog.read_keys(f"{s}.txt")[:3]]
    args = {
        "--coco": layouts.coco_stuff(str(src)),
        "--ade": layouts.ade20k(str(src), n_train=8, classes=ade_ids),
        "--ade-full": layouts.ade20k_full(str(src), classes=full_ids),
        "--imagenet": layouts.imagenet(str(src), wnids),
    }
    out = tmp_path_factory.mktemp("data")
    cmd = [sys.executable, "-m", "data_prep.prepare", "--out", str(out), "--workers", "2"]
    cmd += [x for kv in args.items() for x in kv]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = {s["name"]: s for s in json.loads((out / "prepare_summary.json").read_text())}
    assert set(summary) == {
        "c171",
        "wa150",
        "a150",
        "wa847",
        "a847",
        "a585",
        "i124",
        "i585",
        "i11k",
    }
    assert summary["wa150"]["rejects"] == {"not an image": 1, "unreadable image": 1}
    assert "wa150: 8 train images (also as a150_seg)" in run.stdout
    return str(out)


def test_prepare_is_idempotent(prepared):
    cmd = [sys.executable, "-m", "data_prep.prepare", "--out", prepared, "--ade", "/nonexistent"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "ADEChallengeData2016" in run.stderr


def tiny(cfg, data_dir):
    cfg.data.dir = data_dir
    cfg.model.variant = "micro"
    cfg.model.pos_grid = (4, 4)
    cfg.model.drop_path_rate = 0.0
    for entry in cfg.data.sources.values():
        entry.crop = 32
    cfg.data.images_per_group = 1
    cfg.data.num_workers = 0
    cfg.data.max_labels = 8
    cfg.ca.topk = 8  # at most the 16 feature pixels of a 32-px crop
    cfg.train.total_steps = cfg.train.checkpoint_every_steps = cfg.train.eval_every_steps = 2
    cfg.train.log_every_steps = 1
    cfg.eval.short_side = cfg.eval.crop_size = cfg.eval.stride = 48
    cfg.eval.num_panels = 1
    return cfg


@pytest.mark.parametrize(
    "name", [n if n in COVERING else pytest.param(n, marks=pytest.mark.slow) for n in PAPER_CONFIGS]
)
def test_paper_config_trains_and_evaluates(prepared, tmp_path, name):
    cfg = tiny(importlib.import_module(f"configs.{name}").get_config(), prepared)
    report = train.train_and_evaluate(cfg, str(tmp_path))
    assert report["step"] == 2 and report["num_images"] == 4
    eval_set = cfg.data.eval_source
    if SPLITS[eval_set]:
        assert (report["num_base"], report["num_novel"]) == SPLITS[eval_set]
    assert report["num_base"] + report["num_novel"] == len(catalog.class_names(eval_set))
    for key in ("miou", "miou_base", "miou_novel", "hiou"):
        assert report[key] is not None and 0 <= report[key] <= 100, key
    frequency = report["frequency"]
    assert frequency["source"] == catalog.get(eval_set).frequency_source
    buckets = sum(frequency[f"num_{b}"] for b in ("rare", "common", "frequent"))
    assert buckets == report["num_classes"]
    assert os.path.exists(tmp_path / "eval" / "step_2.json")
