"""Tests for the TF-free TensorBoard writer: read events back with TensorBoard's own loader."""

import io
import os

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from larvseg_jax.tb_writer import TensorBoardWriter


def load(logdir):
    guidance = {
        event_accumulator.SCALARS: 0,
        event_accumulator.IMAGES: 0,
        event_accumulator.TENSORS: 0,
    }
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance=guidance)
    acc.Reload()
    return acc


def test_scalars_images_and_texts_read_back(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    batch = rng.integers(0, 256, size=(2, 5, 4, 3), dtype=np.uint8)
    writer = TensorBoardWriter(tmp_path)
    writer.write_scalars(1, {"train/loss_seg": 2.5, "eval/miou_novel": 31.25})
    writer.write_scalars(2, {"train/loss_seg": np.float32(1.5)})
    writer.write_images(2, {"eval/panel": image, "eval/batch": batch})
    writer.write_texts(2, {"config": "lr: 0.001"})
    writer.close()

    acc = load(tmp_path)
    tags = acc.Tags()
    assert set(tags["tensors"]) == {"train/loss_seg", "eval/miou_novel", "config"}
    # TF2-style scalars: tensors carrying the `scalars` plugin, as TensorBoard's dashboard expects.
    assert set(acc.PluginTagToContent("scalars")) == {"train/loss_seg", "eval/miou_novel"}
    assert set(acc.PluginTagToContent("text")) == {"config"}
    loss = [
        (e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
        for e in acc.Tensors("train/loss_seg")
    ]
    assert loss == [(1, 2.5), (2, 1.5)]
    assert float(tensor_util.make_ndarray(acc.Tensors("eval/miou_novel")[0].tensor_proto)) == 31.25
    text = tensor_util.make_ndarray(acc.Tensors("config")[0].tensor_proto)
    assert text.item() == b"lr: 0.001"

    assert set(tags["images"]) == {"eval/panel", "eval/batch/0", "eval/batch/1"}
    for tag, want in [
        ("eval/panel", image),
        ("eval/batch/0", batch[0]),
        ("eval/batch/1", batch[1]),
    ]:
        (event,) = acc.Images(tag)
        assert event.step == 2 and (event.height, event.width) == want.shape[:2]
        decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))
        np.testing.assert_array_equal(decoded, want)


def test_disabled_writer_writes_nothing(tmp_path):
    logdir = tmp_path / "tb"
    writer = TensorBoardWriter(logdir, enabled=False)
    writer.write_scalars(1, {"a": 1.0})
    writer.write_images(1, {"b": np.zeros((2, 2, 3), np.uint8)})
    writer.write_texts(1, {"c": "x"})
    writer.flush()
    writer.close()
    assert not os.path.exists(logdir)
