"""`python -m larvseg_jax.segment` and `larvseg_jax.inference` on a tiny trained model: outputs
for real photos of every colour mode, the evaluation path reproduced exactly, vocabulary
control, attention maps and bad files."""

import dataclasses
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from configs import smoke
from larvseg_jax import (
    checkpoint,
    experiment,
    foreground,
    inference,
    segment,
    slide,
    slide_image,
    tiles,
    train_eval,
    visualize,
)
from larvseg_jax.data import catalog, transforms
from larvseg_jax.errors import ConfigError, DataError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _config():  # the config of conftest.smoke_ca_run
    cfg = smoke.get_config()
    cfg.ca.enabled, cfg.ca.memory_size, cfg.ca.topk = True, 2, 4
    return cfg


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """A folder of the fixture photos in every mode a user may have, plus a rotated JPEG."""
    folder = tmp_path_factory.mktemp("odd_images")
    camera = Image.open(FIXTURES / "images" / "camera.png")
    camera.convert("L").save(folder / "gray.png")
    chelsea = Image.open(FIXTURES / "images" / "chelsea.png").convert("RGB")
    chelsea.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = chelsea.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    chelsea.save(folder / "rotated.jpg", exif=exif.tobytes())  # stored 451 x 300
    return folder


def _run(capsys, *args):
    code = segment.run([str(a) for a in args])
    return code, capsys.readouterr().err


def test_every_image_gets_labels_overlay_and_json_at_its_displayed_size(
    workdir, odd_images, tmp_path, capsys
):
    photo = FIXTURES / "images" / "grace_hopper.jpg"
    code, err = _run(capsys, "--workdir", workdir, "--images", odd_images, photo, "--out", tmp_path)
    assert code == 0, err
    assert "5 of 5 images segmented" in err
    sizes = {"gray": (512, 512), "cmyk": (300, 451), "rgba": (300, 451), "rotated": (451, 300)}
    sizes["grace_hopper"] = Image.open(photo).size[::-1]
    for stem, (h, w) in sizes.items():
        report = json.loads((tmp_path / f"{stem}.json").read_text())
        assert report["size"] == [h, w] and report["step"] == 6
        assert report["vocabulary"] == {"source": "evaluation set syn_eval", "num_classes": 10}
        labels = np.asarray(Image.open(tmp_path / f"{stem}_labels.png"))
        assert labels.shape == (h, w) and labels.max() < 10
        fractions = {c["name"]: c["fraction"] for c in report["classes"]}
        assert abs(sum(fractions.values()) - 1) < 1e-4
        for c in report["classes"]:
            assert np.isclose(np.mean(labels == c["id"]), c["fraction"], atol=1e-6)
            assert 0 < c["mean_confidence"] <= 1
        overlay = np.asarray(Image.open(tmp_path / f"{stem}_overlay.png"))
        assert overlay.shape[1] % w == 0 and overlay.shape[0] > overlay.shape[1] // w * h  # legend
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]


def test_the_prediction_is_the_one_evaluation_scores(workdir, predictor):
    cfg = _config()
    setup = experiment.build_setup(cfg, str(workdir))
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=2, save_every_steps=3
    )
    state = ckpt.restore(6, setup.abstract_state)
    ckpt.close()
    rgb = inference.read_rgb(str(FIXTURES / "images" / "coffee.png"))
    example = {"image": rgb, "label": np.zeros(rgb.shape[:2], np.int32), "class_id": -1, "id": ""}
    image = transforms.EvalResize(cfg.eval.short_side).map(example)["image"]
    runner = slide.SlideRunner(  # as evaluate.run_evaluation runs it
        train_eval.make_predict_fn(setup, state.params),
        num_classes=len(setup.voc.eval_names),
        crop=cfg.eval.crop_size,
        stride=cfg.eval.stride,
        mode=cfg.eval.mode,
        batch=cfg.eval.batch_windows,
    )
    ((_, want, _),) = runner.run([(None, image, rgb.shape[:2])])
    ((_, got),) = predictor.segment_many([(None, rgb)], predictor.index(predictor.default_names))
    np.testing.assert_array_equal(got.labels, want)
    # eval.class_chunk of the checkpoint's config reaches the runner: 3 classes at a time
    # (large-vocabulary path) gives the same labels.
    assert len(predictor.default_names) > 3
    predictor.cfg.eval.class_chunk = 3
    try:
        assert predictor.runner(predictor.index(predictor.default_names)).class_chunk == 3
        ((_, chunked),) = predictor.segment_many(
            [(None, rgb)], predictor.index(predictor.default_names)
        )
    finally:
        predictor.cfg.eval.class_chunk = 1024
    np.testing.assert_array_equal(chunked.labels, want)
    np.testing.assert_allclose(chunked.confidence, got.confidence, rtol=1e-5, atol=1e-6)
    # and the per-image reference path (SPEC 7.2) up to float rounding near ties
    logits = slide_image.slide_inference(
        train_eval.make_predict_fn(setup, state.params),
        image,
        num_classes=len(setup.voc.eval_names),
        crop=cfg.eval.crop_size,
        stride=cfg.eval.stride,
    )
    reference = np.asarray(tiles.resize_to_labels(logits, rgb.shape[:2])[0])
    assert np.mean(reference == got.labels) > 0.999


def test_a_class_subset_restricts_the_prediction(workdir, tmp_path, capsys):
    (tmp_path / "names.txt").write_text("sky\nwater\n")
    photo = FIXTURES / "images" / "chelsea.png"
    for flag, value, n in (
        ("--classes", "sky, water,boat", 3),
        ("--vocab", tmp_path / "names.txt", 2),
    ):
        out = tmp_path / flag.strip("-")
        code, err = _run(capsys, "--workdir", workdir, "--images", photo, "--out", out, flag, value)
        assert code == 0, err
        report = json.loads((out / "chelsea.json").read_text())
        assert report["vocabulary"]["num_classes"] == n
        assert {c["name"] for c in report["classes"]} <= {"sky", "water", "boat"}
        assert np.asarray(Image.open(out / "chelsea_labels.png")).max() < n


@pytest.mark.parametrize(
    "args, message",
    [
        (["--classes", "bota,sky"], "--classes: 'bota' is not one of the 10 classes this model"),
        (["--classes", "bota,sky"], "closest: boat"),
        (["--classes", "sky,sky"], "classes 1 and 2 are both named 'sky'"),
        (["--dataset", "a15"], "unknown --dataset 'a15'"),
        (["--dataset", "a150"], "--dataset a150: 'building' (and 139 more) is not one"),
        (["--attention", "tent", "--classes", "sky"], "--attention 'tent' is not in the vocab"),
        (["--step", "4"], "no checkpoint of step 4 in"),
        (["--background", "sky"], "--background needs --foreground-only"),
        (["--foreground-only", "--background", "sky,bota"], "--background: 'bota' is not one"),
    ],
)
def test_vocabulary_and_checkpoint_mistakes_are_one_line(workdir, tmp_path, capsys, args, message):
    photo = FIXTURES / "images" / "chelsea.png"
    code, err = _run(capsys, "--workdir", workdir, "--images", photo, "--out", tmp_path, *args)
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not os.listdir(tmp_path)


def test_wnids_and_wordnet_lemmas_stand_for_their_imagenet_class(predictor):
    names, wnids = catalog.read_names("i124.txt"), catalog.read_keys("i124.txt")
    imagenet = dataclasses.replace(predictor, union=names)
    assert imagenet.resolve([wnids[3], names[5]], "--classes") == (names[3], names[5])
    got = imagenet.resolve(["passenger vehicle", "chest_of_drawers", "pillar"], "--classes")
    assert got == ("bus", "chest of drawers", "column")  # any lemma, spaces or underscores
    with pytest.raises(DataError, match="classes 1 and 2 are both named 'bus'"):
        imagenet.resolve(["autobus", "bus"], "--classes")
    with pytest.raises(ConfigError, match=r"'bike' is a lemma of several classes: .*bicycle"):
        imagenet.resolve(["bike"], "--classes")


def test_the_packaged_lemma_table_is_the_fixtures_rows_for_the_catalog_synsets():
    fixture = set((FIXTURES / "classes" / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    packaged = (catalog.CLASSES_DIR / "imagenet_lemmas.txt").read_text().splitlines()
    assert set(packaged) <= fixture
    assert [line.split("\t")[0] for line in packaged] == list(catalog.read_keys("i11k.txt"))


def test_attention_map_of_a_class(workdir, predictor, tmp_path, capsys):
    photo = FIXTURES / "images" / "rocket.jpg"
    code, err = _run(
        capsys, "--workdir", workdir, "--images", photo, "--out", tmp_path, "--attention", "sky"
    )
    assert code == 0, err
    picture = np.asarray(Image.open(tmp_path / "rocket_attention_sky.png"))
    assert picture.shape == inference.read_rgb(str(photo)).shape
    att = predictor.attention(
        inference.read_rgb(str(photo)),
        predictor.index(predictor.default_names),
        predictor.default_names.index("sky"),
    )
    assert att.min() >= 0 and att.max() <= 1 and att.std() > 0
    without = dataclasses.replace(predictor, bank=None)
    with pytest.raises(ConfigError, match="has no memory bank"):
        without.attention(inference.read_rgb(str(photo)), predictor.index(("sky",)), 0)


def test_bad_files_are_named_and_skipped_and_the_exit_status_says_so(workdir, tmp_path, capsys):
    images = tmp_path / "in"
    images.mkdir()
    for name in ("not_an_image.jpg", "truncated.jpg"):
        shutil.copy(FIXTURES / "bad" / name, images / name)
    shutil.copy(FIXTURES / "images" / "astronaut.png", images / "astronaut.png")
    out = tmp_path / "out"
    code, err = _run(
        capsys, "--workdir", workdir, "--images", images, "missing/*.png", "--out", out
    )
    assert code == 1
    assert "skipped missing/*.png: matches no file" in err
    assert f"skipped {images / 'not_an_image.jpg'}: not a readable image" in err
    assert f"skipped {images / 'truncated.jpg'}: not a readable image" in err
    assert "1 of 3 images segmented" in err
    assert sorted(os.listdir(out)) == [
        "astronaut.json",
        "astronaut_labels.png",
        "astronaut_overlay.png",
    ]


def test_images_batched_over_two_devices_equal_one_image_at_a_time(workdir, predictor):
    """segment_many packs the windows of consecutive images into one model call per device;
    the labels do not depend on the device count or on which images share a call."""
    names = ("grace_hopper.jpg", "chelsea.png", "coffee.png", "camera.png", "astronaut.png")
    photos = [inference.read_rgb(str(FIXTURES / "images" / n)) for n in names]
    index = predictor.index(predictor.default_names)
    two = inference.load(str(workdir), devices=jax.local_devices()[:2])
    batched = list(two.segment_many(enumerate(photos), index))
    assert [i for i, _ in batched] == list(range(len(photos)))
    for (_, got), rgb in zip(batched, photos, strict=True):
        ((_, want),) = predictor.segment_many([(None, rgb)], index)  # alone, on 8 devices
        np.testing.assert_array_equal(got.labels, want.labels)
        np.testing.assert_array_equal(got.confidence, want.confidence)
        interactive = predictor.segment(rgb, index)  # a smaller model call for its windows
        assert np.mean(interactive.labels == got.labels) > 0.9999


def test_foreground_only_greys_exactly_the_background_and_names_the_rest(workdir, tmp_path, capsys):
    photo = FIXTURES / "images" / "coffee.png"
    for background, want in ((None, catalog.SYNTHETIC_BASE), ("sky,water", ("sky", "water"))):
        out = tmp_path / str(background)
        extra = () if background is None else ("--background", background)
        args = ("--workdir", workdir, "--images", photo, "--out", out, "--foreground-only")
        code, err = _run(capsys, *args, *extra)
        assert code == 0, err
        report = json.loads((out / "coffee.json").read_text())
        assert report["foreground"]["background"] == list(want)
        assert report["files"]["foreground"] == "coffee_foreground.png"
        labels = np.asarray(Image.open(out / "coffee_labels.png"))
        names = tuple(catalog.class_names("syn_eval"))
        is_bg = np.isin(np.asarray(names), want)
        present = {names[i] for i in np.unique(labels)}
        assert set(report["foreground"]["named"]) <= present - set(want)
        picture = np.asarray(Image.open(out / "coffee_foreground.png"))
        assert picture.shape[:2] == labels.shape  # a 400 x 600 photo is not enlarged
        rgb = inference.read_rgb(str(photo))
        expected = foreground.grey_out(rgb, labels, is_bg, visualize.palette(names))
        # Every pixel is the greyed photo or the overlay, except under the names written.
        same = (picture == expected).all(-1)
        assert same.mean() > 0.9 if report["foreground"]["named"] else same.all()
        background = is_bg[labels]
        assert (picture[background] == picture[background][:, :1]).all()  # names are grey too
