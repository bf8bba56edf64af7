"""Tests for class colours by name, legends and eval / CA attention panels (host-side only)."""

import json
import pathlib

import numpy as np
import pytest

from larvseg_jax import visualize
from larvseg_jax.data import synthetic

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "classes" / "ade20k_150_mmseg.json"
ADE = json.loads(FIXTURE.read_text())
ADE_NAMES = [n.strip() for n in ADE["classes"]]
SYN = list(synthetic.ALL)


def colour_of(names, name):
    return tuple(int(v) for v in visualize.palette(names)[names.index(name)])


def colours_in(image):
    return {tuple(int(v) for v in c) for c in np.unique(image.reshape(-1, 3), axis=0)}


def test_data_file_is_the_mmseg_ade150_palette_with_names_stripped():
    rows = [line.split("\t") for line in visualize.PALETTE_FILE.read_text().splitlines()]
    assert [r[3] for r in rows] == ADE_NAMES
    assert [[int(v) for v in r[:3]] for r in rows] == ADE["palette"]


def test_palette_uses_ade_colours_except_overrides_and_the_duplicate():
    colours = visualize.palette(ADE["classes"])  # unstripped "bed " too
    changed = [n for n, c, ref in zip(ADE_NAMES, colours, ADE["palette"]) if list(c) != ref]
    assert sorted(changed) == sorted(["skyscraper", *visualize.OVERRIDES])
    assert colour_of(ADE_NAMES, "road") == (140, 140, 140)  # first in ADE order keeps it


def test_colour_of_a_name_does_not_depend_on_vocabulary_order_or_content():
    unknown = ["zebra crossing", "lighthouse", "kayak"]
    vocabs = [
        SYN,
        SYN[::-1],
        ["flower", "road", "skyscraper", "water"] + unknown,
        ADE_NAMES + unknown,
        (unknown + ADE_NAMES)[::-1],
    ]
    for name in ["water", "grass", "sky", "road", "flower", *unknown]:
        seen = {colour_of(v, name) for v in vocabs if name in v}
        assert len(seen) == 1, (name, seen)
    # The nudged duplicate is stable too: the winner is fixed by table rank, not vocabulary order.
    assert colour_of(["skyscraper", "road"], "skyscraper") == colour_of(ADE_NAMES, "skyscraper")
    assert colour_of(["skyscraper"], "skyscraper") == (140, 140, 140)


@pytest.mark.parametrize("vocab", [SYN, ADE_NAMES, ADE_NAMES + [f"thing {i}" for i in range(700)]])
def test_palette_is_distinct_within_a_vocabulary_and_never_black(vocab):
    colours = visualize.palette(vocab)
    assert colours.shape == (len(vocab), 3) and colours.dtype == np.uint8
    assert len({c.tobytes() for c in colours}) == len(vocab)
    assert colours.max(-1).min() >= 80  # darkest ADE colour is floor [80, 50, 50]


def test_repeated_names_share_a_colour():
    colours = visualize.palette(["road", "skyscraper", "road"])
    np.testing.assert_array_equal(colours[0], colours[2])
    assert colours[0].tobytes() != colours[1].tobytes()


def test_synthetic_classes_get_sensible_colours():
    r, g, b = colour_of(SYN, "water")
    assert b > 150 and b > r + 80 and b > g + 80, "water should be blue"
    r, g, b = colour_of(SYN, "grass")
    assert g > 150 and g > r + 80 and g > b + 80, "grass should be green"
    r, g, b = colour_of(SYN, "sky")
    assert min(g, b) > 180 and b >= r, "sky should be a light blue"
    dist = np.abs(np.subtract(colour_of(SYN, "sky"), colour_of(SYN, "water"))).sum()
    assert dist > 150, "sky and water must not look alike"


def test_unknown_names_get_stable_bright_colours():
    names = [f"class {i}" for i in range(200)]
    colours = visualize.palette(names)
    assert colours.max(-1).min() >= 0.7 * 255 - 1  # HSV value >= 0.7: never near-black
    np.testing.assert_array_equal(colours, visualize.palette(names))
    assert visualize.name_colour(" kayak ") == visualize.name_colour("kayak")
    assert visualize.name_colour("kayak") != visualize.name_colour("canoe")


def test_colorize_maps_ids_and_paints_ignore_black():
    colours = visualize.palette(SYN)
    label = np.array([[0, -1], [9, 3]])
    out = visualize.colorize(label, colours)
    np.testing.assert_array_equal(out[0, 1], 0)
    np.testing.assert_array_equal(out[1, 0], colours[9])
    np.testing.assert_array_equal(out[0, 0], colours[0])
    with pytest.raises(ValueError):
        visualize.colorize(np.array([[10]]), colours)


def test_legend_entries_list_exactly_the_present_classes():
    names = ["a ", "b", "c", "d", "e"]
    colours = visualize.palette(names)
    gt = np.array([[0, 2], [-1, 2]])
    pred = np.array([[3, 2], [2, 0]])
    entries = visualize.legend_entries([gt, pred], names, colours)
    assert [n for n, _ in entries] == ["a", "c", "d", "ignore"]
    assert entries[1][1] == tuple(int(v) for v in colours[2]) and entries[3][1] == (0, 0, 0)
    assert [n for n, _ in visualize.legend_entries([pred], names, colours)] == ["a", "c", "d"]


def synthetic_example():
    raw, gt = synthetic.make_example("eval", np.random.default_rng(3), synthetic.DEFAULT_KNOBS)
    pred = gt.copy()
    pred[:8, :8] = SYN.index("flower")  # only in the prediction
    gt = gt.copy()
    gt[-4:] = -1
    return raw, gt, pred


def test_panel_is_enlarged_with_a_legend_of_the_present_classes():
    raw, gt, pred = synthetic_example()
    colours = visualize.palette(SYN)
    out = visualize.panel(raw, gt, pred, colours, SYN)
    h, w = gt.shape
    s = out.shape[1] // (3 * w)
    assert out.dtype == np.uint8 and out.shape[1] == 3 * w * s and s * h >= visualize.MIN_HEIGHT
    assert s * h < visualize.MIN_HEIGHT + h  # the smallest integer scale, not more
    strip = np.concatenate(
        [raw, visualize.colorize(gt, colours), visualize.colorize(pred, colours)], 1
    )
    np.testing.assert_array_equal(out[: s * h], strip.repeat(s, 0).repeat(s, 1))
    drawn = colours_in(out[s * h :])
    present = set(np.unique(np.concatenate([gt.ravel(), pred.ravel()]))) - {-1}
    assert SYN.index("flower") in present
    for i, c in enumerate(map(tuple, colours.tolist())):
        if len(set(c)) > 1:  # greys (road, wall) also occur in anti-aliased text
            assert (c in drawn) == (i in present), SYN[i]
    assert (0, 0, 0) in drawn  # the ignore swatch


def legend_height(out, h, w):
    return out.shape[0] - out.shape[1] // (3 * w) * h


def test_panel_of_a_large_image_keeps_its_size_and_uses_larger_text():
    colours = visualize.palette(SYN)
    raw, gt, pred = synthetic_example()
    small = visualize.panel(raw, gt, pred, colours, SYN)
    big_gt = np.zeros((600, 800), np.int32)
    out = visualize.panel(np.zeros((600, 800, 3), np.uint8), big_gt, big_gt + 1, colours, SYN)
    assert out.shape[1] == 2400 and out.shape[0] > 600  # not enlarged
    assert legend_height(out, 600, 800) > 1.5 * legend_height(small, *gt.shape)


def test_legend_wraps_to_the_given_width():
    entries = [(f"class number {i}", (200, 10 * i, 50)) for i in range(12)]
    one_row = visualize.legend(entries[:1], 400)
    wrapped = visualize.legend(entries, 400)
    assert one_row.shape[1] == wrapped.shape[1] == 400
    assert wrapped.shape[0] >= 4 * one_row.shape[0] // 2
    assert visualize.legend([], 400).shape == (0, 400, 3)
    assert {e[1] for e in entries} <= colours_in(wrapped)


def test_attention_sheet_captions_each_row_with_its_class_colour():
    raw, gt, _ = synthetic_example()
    ramp = np.stack([np.linspace(20, 255, 32), np.linspace(20, 230, 32), np.full(32, 60)], -1)
    ramp = ramp.astype(np.uint8)
    panels = []
    for c in np.unique(gt[gt >= 0])[:2]:
        mask = np.where(gt == c, 255, 40).astype(np.uint8)[..., None].repeat(3, -1)
        panels.append((f"syn_eval_000001/{SYN[c]}", np.concatenate([raw, mask, raw], 1)))
    panels.append(("im/x/sky", np.zeros((32, 48, 3), np.uint8)))  # narrower row, "/" in the id
    sheet = visualize.attention_sheet(panels, SYN, heat_ramp=ramp)
    colours = visualize.palette(SYN)
    drawn = colours_in(sheet)
    for title, _ in panels:
        assert tuple(colours[SYN.index(title.rsplit("/", 1)[1])].tolist()) in drawn
    assert tuple(ramp[-1].tolist()) in drawn and tuple(ramp[0].tolist()) in drawn
    assert sheet.dtype == np.uint8 and sheet.shape[1] == max(
        visualize.enlarge(p, 192).shape[1] for _, p in panels
    )
