"""Foreground-only rendering (paper Fig. 5): which pixels are greyed, where names go, the
default background sets and the names written for ImageNet wnids."""

import numpy as np

from larvseg_jax import foreground, visualize
from larvseg_jax.data import catalog


def test_grey_out_greys_exactly_the_background_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (6, 7))
    background = np.array([True, False, True, False])
    colours = visualize.palette(["sky", "boat", "water", "car"])
    out = foreground.grey_out(rgb, labels, background, colours)
    is_bg = background[labels]
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114]
    np.testing.assert_allclose(out[is_bg], np.repeat((64 + luma / 2)[is_bg, None], 3, 1), atol=0.51)
    blend = 0.45 * rgb + 0.55 * colours[labels].astype(np.float64)
    np.testing.assert_allclose(out[~is_bg], blend[~is_bg], atol=0.51)
    assert (out[is_bg] == out[is_bg][:, :1]).all()  # R = G = B


def test_names_go_inside_their_largest_regions_and_not_on_background():
    labels = np.zeros((40, 60), int)
    labels[5:25, 5:30] = 1  # a large boat
    labels[30:34, 40:44] = 1  # a small second boat
    labels[10:20, 40:55] = 2  # a car
    labels[0, 0] = 3  # one pixel of a tent: below the minimum size
    places = foreground.name_places(labels, np.array([True, False, False, False]))
    assert [c for c, _, _ in places] == [1, 2, 1]  # by region size
    for c, y, x in places:
        assert labels[y, x] == c
    y, x = places[0][1:]  # farthest from the large boat's border: 10 pixels from every side
    assert 14 <= y <= 15 and 14 <= x <= 20


def test_render_enlarges_small_images_and_lists_the_names_written():
    labels = np.zeros((32, 48), int)
    labels[8:24, 10:40] = 1
    rgb = np.full((32, 48, 3), 128, np.uint8)
    names = ("water", "n02084071")
    picture, written = foreground.render(
        rgb, labels, names, np.array([True, False]), visualize.palette(names)
    )
    assert picture.shape == (256, 384, 3) and written == ["n02084071"]
    assert (picture[: 8 * 8] == picture[: 8 * 8, :, :1]).all()  # background rows stay grey


def test_default_background_sets():
    assert foreground.default_background(synthetic=True) == catalog.SYNTHETIC_BASE
    stuff = foreground.coco_stuff_names()
    raw = [n for k, n in catalog.read_columns("c171.txt") if int(k) >= 92]
    assert len(raw) == 91 and set(raw) <= set(stuff)
    assert {"wall", "sky", "grass", "water", "wall-brick", "sky-other"} <= set(stuff)
    assert not {"person", "car", "boat", "dog"} & set(stuff)  # COCO things


def test_wnids_are_written_as_their_first_lemma():
    assert foreground.display_name("n02084071") == "dog"
    assert foreground.display_name("traffic_light") == "traffic light"
    assert foreground.display_name("n99999999") == "n99999999"
