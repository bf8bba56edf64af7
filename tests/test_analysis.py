"""The paper's analyses (`larvseg_jax.analysis`) on the tiny smoke model and the synthetic world:
the oracle against a numpy version of SPEC 9, its quirk and the fix, seeded reproducibility,
response maps, model comparison and their one-line errors."""

import io
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from larvseg_jax import evaluate
from larvseg_jax.analysis import affinity, compare, evalset, oracle, response_maps
from larvseg_jax.data import transforms
from tests import reference

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def images(predictor):
    return evalset.open_eval_set(predictor)


def _feature_embed(predictor, image):
    """aux["embed"] [h, w, D] of the model, applied directly (not through `affinity`)."""
    index = predictor.index(predictor.default_names)
    _, aux = predictor.model.apply(
        {"params": predictor.params}, jnp.asarray(image)[None], index, train=False
    )
    return np.asarray(aux["embed"][0], np.float64)


@pytest.mark.parametrize("absent_never_win", [False, True])
def test_oracle_labels_equal_a_numpy_reference_of_spec_9(predictor, images, absent_never_win):
    example = images.dataset[0]
    gt = np.asarray(example["label"])
    # An input smaller than the original, so the final resize is a real one.
    rgb = transforms.resize_bilinear(np.asarray(example["raw"]), 40, 52)
    image = transforms.normalize(rgb)
    small = oracle.gt_at(gt, (40, 52))
    embed = affinity.embedding_fn(predictor)(image)
    feature = _feature_embed(predictor, image)
    want_embed = reference.l2n(reference.upsample(feature[None], (40, 52))[0])
    np.testing.assert_allclose(np.asarray(embed), want_embed, atol=2e-5)

    got = oracle.oracle_labels(
        embed,
        small,
        num_classes=len(images.class_names),
        out_hw=gt.shape,
        points=3,
        rng=np.random.default_rng(7),
        absent_never_win=absent_never_win,
    )
    classes, seeds = oracle.draw_seeds(small, 3, np.random.default_rng(7))
    want = reference.oracle_labels(
        feature,
        small,
        {int(c): s for c, s in zip(classes, seeds)},
        len(images.class_names),
        gt.shape,
        absent_never_win,
    )
    assert got.shape == gt.shape
    assert np.mean(got == want) > 0.999  # float32 against float64: near-ties may differ


def test_seeds_lie_in_their_masks_and_respond_one_to_themselves(predictor, images):
    example = images.dataset[1]
    image = np.asarray(example["image"])
    small = oracle.gt_at(np.asarray(example["label"]), image.shape[:2])
    classes, seeds = oracle.draw_seeds(small, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(classes, np.unique(small[small >= 0]))
    flat = small.ravel()
    for c, row in zip(classes, seeds):
        assert (flat[row] == c).all() and len(set(row)) == min(4, int((flat == c).sum()))
    response = np.asarray(
        affinity.seed_responses(affinity.embedding_fn(predictor)(image), jnp.asarray(seeds))
    )
    assert response.shape == small.shape + (len(classes),)
    at_seeds = response.reshape(-1, len(classes))[seeds, np.arange(len(classes))[:, None]]
    np.testing.assert_allclose(at_seeds, 1.0, atol=1e-5)
    assert response.min() >= -1 - 1e-5 and response.max() <= 1 + 1e-5


def test_an_absent_class_wins_where_every_present_cosine_is_negative_unless_fixed():
    # Classes 1 and 3 of 5 are present; the middle column belongs to neither (ignore) and its
    # embedding points away from both seeds.
    e1, e3, away = [1.0, 0.0], [0.0, 1.0], [-0.8, -0.6]
    embed = jnp.asarray([[e1, away, e3]] * 2, jnp.float32)  # [2, 3, 2]
    gt = np.array([[1, -1, 3], [1, -1, 3]])

    def labels(fix):
        rng = np.random.default_rng(0)
        return oracle.oracle_labels(
            embed, gt, num_classes=5, out_hw=(2, 3), points=1, rng=rng, absent_never_win=fix
        )

    faithful = labels(False)
    np.testing.assert_array_equal(faithful, [[1, 0, 3], [1, 0, 3]])  # class 0: absent, score 0
    fixed = labels(True)
    np.testing.assert_array_equal(fixed, [[1, 3, 3], [1, 3, 3]])  # -0.6 beats -0.8
    # The first absent class stands for all of them: with 0 present, class 1 would win.
    source, ids = oracle.channel_order(np.array([0, 2]), 5, absent_never_win=False)
    np.testing.assert_array_equal(ids, [0, 1, 2])
    np.testing.assert_array_equal(source, [0, 2, 1])


def _oracle(capsys, workdir, out, *extra):
    args = ["--workdir", workdir, "--out", out, "--limit", "2", "--repeats", "2", *extra]
    code = oracle.run([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0, err
    (path,) = pathlib.Path(out).glob("oracle_*.json")
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text())


def test_oracle_command_reproduces_with_a_seed_and_reports_every_category_set(
    workdir, tmp_path, capsys
):
    first = _oracle(capsys, workdir, tmp_path / "a")
    again = _oracle(capsys, workdir, tmp_path / "b")
    other = _oracle(capsys, workdir, tmp_path / "c", "--seed", "1")
    assert first == {**again, "checkpoint": first["checkpoint"]}
    assert first["repeats"] != other["repeats"]
    assert first["num_images"] == 2 and first["categories"] == "novel"
    assert first["num_classes"] == {"novel": 4, "base": 6, "all": 10}
    for which, key in (("novel", "miou_novel"), ("base", "miou_base"), ("all", "miou")):
        stats = first["by_category"][which]
        values = [r[key] for r in first["repeats"]]
        assert stats["per_repeat"] == values
        kept = [v for v in values if v is not None]
        assert stats["mean"] == pytest.approx(np.mean(kept))
        assert stats["std"] == pytest.approx(np.std(kept))
    assert first["miou"] == first["by_category"]["novel"]
    table = (tmp_path / "a" / "oracle_syn_eval_points1_repeats2_seed0_limit2.md").read_text()
    assert "| novel | 4 |" in table and "| base | 6 |" in table and "| all | 10 |" in table


@pytest.mark.parametrize(
    "module, args, message",
    [
        (oracle, ["--categories", "nouvel"], "--categories 'nouvel': unknown; use novel, base"),
        (oracle, ["--dataset", "a15"], "--dataset 'a15': not an evaluation set"),
        (oracle, ["--points", "0"], "--points 0: must be at least 1"),
        (response_maps, ["--classes", "bota"], "--classes: 'bota' is not a class of syn_eval"),
        (response_maps, ["--categories", "rare"], "--categories 'rare': unknown category set"),
        (response_maps, ["--images", "99"], "--images '99': not an image file, an index"),
        (response_maps, ["--images", FIXTURES / "bad" / "truncated.jpg"], "not a readable image"),
    ],
)
def test_mistakes_are_one_line(module, args, message, workdir, tmp_path, capsys):
    code = module.run([str(a) for a in ["--workdir", workdir, "--out", tmp_path, *args]])
    err = capsys.readouterr().err
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("module", [oracle, response_maps])
def test_a_workdir_without_checkpoint_is_one_line(module, tmp_path, capsys):
    code = module.run(["--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "no checkpoint in" in err and len(err.strip().splitlines()) == 1


def test_response_maps_png_json_and_tensorboard(workdir, images, tmp_path, capsys):
    photo = FIXTURES / "images" / "chelsea.png"
    args = ["--workdir", workdir, "--out", tmp_path, "--images", "1", photo, "--points", "2"]
    code = response_maps.run([str(a) for a in args])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "response_maps.json").read_text())
    first = images.dataset[1]
    present = np.unique(first["label"][first["label"] >= 0])
    entry = report["images"][0]
    assert entry["seeds_from"] == "ground truth"
    assert [c["class"] for c in entry["classes"]] == [images.class_names[i] for i in present]
    small = oracle.gt_at(np.asarray(first["label"]), first["image"].shape[:2])
    for c in entry["classes"]:
        np.testing.assert_allclose(c["response_at_seeds"], 1.0, atol=1e-5)
        for y, x in c["seeds_yx"]:
            assert images.class_names[small[y, x]] == c["class"]
    # The oracle's first repetition draws the same seeds for evaluation image 1.
    _, seeds = oracle.draw_seeds(small, 2, np.random.default_rng((0, 0, 1)))
    width = small.shape[1]
    assert [list(divmod(int(p), width)) for p in dict.fromkeys(seeds[0])] == entry["classes"][0][
        "seeds_yx"
    ]
    assert report["images"][1]["seeds_from"] == "prediction (no ground truth)"
    row = np.asarray(Image.open(tmp_path / f"{first['id']}_response_maps.png"))
    s = -(-response_maps.TILE_SIDE // min(small.shape))
    tiles = 2 + len(present)  # input, ground truth, one per class
    gaps = 4 * (tiles - 1)
    assert row.shape[1] == tiles * s * small.shape[1] + gaps and row.shape[0] > s * small.shape[0]
    assert (tmp_path / "chelsea_response_maps.png").exists()
    sheet = np.asarray(Image.open(tmp_path / "response_maps.png"))
    assert sheet.shape[0] > row.shape[0]

    acc = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert tags == {f"analysis/response_maps/{first['id']}", "analysis/response_maps/chelsea"}
    (event,) = acc.Images(f"analysis/response_maps/{first['id']}")
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
    np.testing.assert_array_equal(decoded, row)


def test_minmax_and_cosine_scales():
    r = np.array([[-0.5, 0.0], [0.5, 1.0]])
    np.testing.assert_allclose(response_maps.scaled(r, "minmax"), [[0, 1 / 3], [2 / 3, 1]])
    np.testing.assert_allclose(response_maps.scaled(r, "cosine"), [[0.25, 0.5], [0.75, 1.0]])
    assert not response_maps.scaled(np.ones((2, 2)), "minmax").any()


def test_compare_tiles_carry_evaluations_metric_of_each_image(
    workdir, predictor, images, tmp_path, capsys
):
    args = ["--workdirs", workdir, workdir, "--titles", "one,two", "--images", "0", "2"]
    code = compare.run([str(a) for a in [*args, "--out", tmp_path, "--highlight", "novel"]])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["highlight"] == {"set": "novel", "classes": list(images.novel)}
    examples = [images.dataset[0], images.dataset[2]]
    index = predictor.index(predictor.default_names)
    preds = [
        p.labels for _, p in predictor.segment_many(enumerate(ex["raw"] for ex in examples), index)
    ]
    totals = 0
    for entry, ex, pred in zip(report["images"], examples, preds):
        inter, pred_area, gt_area = evaluate.class_histograms(pred, ex["label"], 10)
        want = evaluate.miou_report(
            inter,
            pred_area + gt_area - inter,
            gt_area,
            class_names=images.class_names,
            novel_names=images.novel,
        )
        totals = totals + np.stack([inter, pred_area, gt_area])
        assert entry["image"] == ex["id"]
        for title in ("one", "two"):
            got = entry["models"][title]
            assert got["miou"] == pytest.approx(want["miou"])
            assert got["miou_highlight"] == pytest.approx(want["miou_novel"])
            assert got["per_class_iou"] == want["per_class_iou"]
            assert compare.caption(got, title, "novel")[1].startswith(f"mIoU {want['miou']:.1f}")
    sheet = np.asarray(Image.open(tmp_path / "compare.png"))
    widest = max(
        -(-compare.TILE_SIDE // min(ex["label"].shape)) * ex["label"].shape[1] for ex in examples
    )
    assert sheet.shape[1] >= 4 * widest  # input | truth | one | two


def test_compare_fades_exactly_the_classes_outside_the_highlighted_set():
    colours = np.array([[10, 20, 30], [200, 100, 0], [0, 0, 255]], np.uint8)
    shown = compare.highlighted_colours(colours, np.array([False, True, False]))
    np.testing.assert_array_equal(shown[1], colours[1])
    np.testing.assert_array_equal(shown[[0, 2]], [[182, 184, 188], [178, 178, 255]])  # 70 % white


def test_compare_refuses_unknown_highlight_and_mismatched_titles(workdir, tmp_path, capsys):
    for extra, message in (
        (["--highlight", "bota"], "--highlight: 'bota' is not a class of syn_eval"),
        (["--titles", "a,b"], "--titles has 2 names for 1 --workdirs"),
    ):
        code = compare.run([str(a) for a in ["--workdirs", workdir, "--out", tmp_path, *extra]])
        err = capsys.readouterr().err
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
