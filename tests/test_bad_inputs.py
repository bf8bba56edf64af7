"""Bad inputs a user meets: each is one clear error naming the file, record or key and what to
do, before anything half-done is left looking complete. (Converter-side bad files are
tests/data/test_converters.py's subject; command-line mistakes tests/test_main.py's.)"""

import io
import os
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import base, smoke
from larvseg_jax import experiment, train
from larvseg_jax.data import catalog, sources, synthetic, transforms
from larvseg_jax.errors import ConfigError, DataError, WorkdirError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_a_label_map_of_another_size_names_the_record():
    record = {"image": np.zeros((6, 8, 3), np.uint8), "label": np.zeros((6, 7, 1), np.uint8)}
    record["image_id"] = b"street_7"
    with pytest.raises(DataError, match=r"toy record 'street_7': its label map is 6x7 but its"):
        transforms.Decode("toy", 4).map(record)


def _world_with_bad_syn_seg(root, label_of) -> str:
    """The smoke config's synthetic world with syn_seg rewritten by a hand-made converter that
    checks nothing: every record's label is `label_of(image)`."""
    cfg = smoke.get_config()
    world = synthetic.ensure_synthetic(str(root), cfg.data.synthetic)
    directory = sources.source_dir(world, "syn_seg")
    shutil.rmtree(directory)
    os.makedirs(directory)
    dataset = catalog.get("syn_seg")
    writer = sources.ShardWriter(
        sources.shard_path(directory, "train", 0, 1),
        sources.features_for("seg", "uint8", "png"),
        kind="seg",
        num_classes=256,  # what a careless converter would let through
        ignore_codes=(255,),
    )
    image = np.full((48, 48, 3), 128, np.uint8)
    for i in range(cfg.data.synthetic.num_seg):
        writer.write({"image": _png(image), "label": label_of(image), "image_id": f"hand_{i}"})
    writer.close()
    sources.finalize_source(
        directory,
        kind="seg",
        class_names=dataset.class_names,
        shard_lengths={"train": [writer.num_records]},
        class_image_counts={"train": writer.counts[: len(dataset.class_names)].tolist()},
    )
    return world


@pytest.mark.parametrize(
    "label_of, message",
    [
        (lambda im: np.zeros((40, 48), np.uint8), r"its label map is 40x48 but its image is 48x48"),
        (lambda im: np.full(im.shape[:2], 200, np.uint8), r"label id 200 is out of range"),
    ],
)
def test_hand_written_records_with_bad_labels_stop_training_in_one_line(
    tmp_path, label_of, message
):
    _world_with_bad_syn_seg(tmp_path / "data", label_of)
    cfg = smoke.get_config()
    cfg.data.dir = str(tmp_path / "data")
    with pytest.raises(DataError, match=r"syn_seg record 'hand_\d+': " + message) as info:
        train.train_and_evaluate(cfg, str(tmp_path / "run"), do_eval=False)
    assert "\n" not in str(info.value)
    assert not os.listdir(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"the class list is empty"),
        ("boat\n\nsky\n", r"class 2 of 3 has an empty name"),
        ("boat\nsky\nwater\nsky\n", r"classes 2 and 4 are both named 'sky'; class names must"),
    ],
)
def test_bad_class_lists_name_the_file_and_the_lines(tmp_path, text, message):
    path = tmp_path / "names.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"classes file {path}: {message}"):
        catalog.read_names(str(path))


def test_the_packaged_class_lists_are_clean():
    # Every list but i11k has unique names; i11k's 699 repeated lemmas share rows (SPEC 5.2).
    for path in sorted(catalog.CLASSES_DIR.glob("*.txt")):
        if path.name == "imagenet_lemmas.txt":  # wnid -> lemmas, not a class list
            continue
        names = catalog.read_names(path.name)
        assert len(names) >= 124
        assert (len(set(names)) == len(names)) == (path.name not in catalog.DUPLICATE_NAMES_OK)


def test_a_source_needs_class_names(tmp_path):
    with pytest.raises(DataError, match=r"source .*: the class list is empty"):
        sources.write_source(
            str(tmp_path), "syn_seg", kind="seg", class_names=(), split_examples={"train": []}
        )
    assert not os.path.exists(
        os.path.join(sources.source_dir(str(tmp_path), "syn_seg"), "metadata.json")
    )


def _replace(cfg, section, **values):
    """What a config file may do: replace a whole section, its types included."""
    cfg[section] = ml_collections.ConfigDict({**cfg[section].to_dict(), **values})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda cfg: _replace(cfg, "train", total_steps=1e4),
            r"train.total_steps=10000.0 must be a whole number \(it is a float\)",
        ),
        (
            lambda cfg: _replace(cfg, "ca", topk="20"),
            r"ca.topk='20' must be a whole number \(it is a str\)",
        ),
        (
            lambda cfg: setattr(
                cfg.data.sources, "syn_seg", base.source(order=1, ratio=3, crop=64.0, weight=1)
            ),
            r"data.sources.syn_seg.crop=64.0 must be a whole number",
        ),
        (
            lambda cfg: setattr(cfg.data.sources.syn_seg, "scale_range", (0.25, 0.5)),
            r"scale_range=\(0.25, 0.5\) never makes an image as large as its 64-px crop",
        ),
        (
            lambda cfg: setattr(cfg.train, "keep_checkpoints_every_steps", 5),
            r"keep_checkpoints_every_steps=5 must be 0 or a multiple of .*_every_steps=3",
        ),
        (
            lambda cfg: setattr(cfg.data.sources.syn_seg, "ratio", 4),
            r"ratio",  # 3 + 4 + 2 groups do not tile the 8 of data.num_groups
        ),
    ],
)
def test_wrong_types_and_impossible_combinations_in_a_config(change, message):
    cfg = smoke.get_config()
    change(cfg)
    with pytest.raises(ConfigError, match=message):
        experiment.validate(cfg)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config", "configs/smoke.py", "--config.train.total_steps=abc"],
            "bad command line: flag --config.train.total_steps=abc: invalid literal for int()",
        ),
        (["--config", "{typed}"], "Could not override field 'total_steps'"),
    ],
)
def test_wrong_types_on_the_command_line_or_in_a_config_file_are_one_line(tmp_path, args, message):
    typed = tmp_path / "typed.py"
    typed.write_text(
        "from configs import smoke\n\n\ndef get_config(arg=None):\n"
        "    cfg = smoke.get_config()\n    cfg.train.total_steps = 1e4\n    return cfg\n"
    )
    args = [a.format(typed=typed) for a in args] + ["--workdir", str(tmp_path / "w")]
    proc = subprocess.run(
        [sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 3


def test_a_workdir_on_a_read_only_mount_is_one_line(tmp_path):
    source, mount = tmp_path / "source", tmp_path / "read_only"
    source.mkdir()
    mount.mkdir()
    bind = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(mount)], check=False)
    if bind.returncode != 0:  # tests/test_main.py covers a workdir under a file instead
        pytest.skip("this machine does not allow a read-only bind mount")
    try:
        with pytest.raises(
            WorkdirError, match=r"workdir .*read_only/run' is not writable \(Read-only"
        ):
            experiment.check_workdir(str(mount / "run"))
        with pytest.raises(WorkdirError, match=r"is not writable \(Read-only file system\)"):
            train.train_and_evaluate(smoke.get_config(), str(mount / "run"))
    finally:
        subprocess.run(["umount", str(mount)], check=True)
