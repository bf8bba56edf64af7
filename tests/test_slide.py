"""The batched sliding-window runner gives the per-image path's predictions and compiles a
handful of programs for a dataset of many image sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.dispatch import BACKEND_COMPILE_EVENT

from larvseg_jax import slide, slide_image, tiles
from tests.test_evaluate import N, fake_predict

CROP, STRIDE = 24, 16


def per_image(image, out_hw, mode="slide"):
    """The SPEC 7.2 reference: one image at a time, one window per model call."""
    logits = slide_image.slide_inference(
        fake_predict, image, num_classes=N, crop=CROP, stride=STRIDE, mode=mode
    )
    labels, conf = tiles.resize_to_labels(logits, out_hw, confidence=True)
    return np.asarray(labels), np.asarray(conf)


def images(seed, sizes):
    rng = np.random.default_rng(seed)
    return [(i, rng.normal(size=(*hw, 3)).astype(np.float32), hw0) for i, (hw, hw0) in sizes]


SIZES = list(
    enumerate(
        [
            ((24, 40), (30, 50)),  # 2 windows, upsampled
            ((32, 24), (32, 24)),  # same size
            ((24, 24), (300, 260)),  # one window, 3 x 3 output tiles (more than one call)
            ((20, 30), (20, 30)),  # a side shorter than the crop: the per-image path
            ((48, 72), (17, 9)),  # 12 windows over two batches, downsampled
            ((24, 96), (24, 97)),
        ]
    )
)


@pytest.mark.parametrize(
    "batch, num_devices, full, class_chunk",
    # class_chunk 2 of N = 5 classes: chunks 0-1, 2-3 and 4 (read as 3-4, class 3 masked).
    [(1, 1, True, 0), (3, 1, True, 0), (2, 3, True, 0), (8, 3, False, 0), (3, 2, True, 2)],
)
def test_runner_equals_the_per_image_path(batch, num_devices, full, class_chunk):
    data = images(0, SIZES)
    runner = slide.SlideRunner(
        fake_predict,
        num_classes=N,
        crop=CROP,
        stride=STRIDE,
        batch=batch,
        devices=jax.local_devices()[:num_devices],
        confidence=True,
        full_batches=full,
        class_chunk=class_chunk,
    )
    out = list(runner.run(data))
    assert [tag for tag, _, _ in out] == [i for i, _, _ in data]  # input order
    for (_, labels, conf), (_, image, hw0) in zip(out, data, strict=True):
        want_labels, want_conf = per_image(image, hw0)
        assert labels.dtype == np.int32 and labels.shape == hw0
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_allclose(conf, want_conf, rtol=1e-6, atol=1e-7)
    # The (20, 30) image's windows are smaller than the crop: it takes the per-image path.
    batched = sum(
        len(slide_image.slide_windows(*im.shape[:2], CROP, STRIDE))
        for _, im, _ in data
        if min(im.shape[:2]) >= CROP
    )
    assert batched <= runner.windows_run < batched + num_devices * batch  # tails padded only
    if full:  # every model call has `batch` windows: one program
        assert runner.windows_run % batch == 0


@pytest.mark.parametrize("class_chunk", [0, 3])
def test_whole_mode_and_no_confidence(class_chunk):
    data = images(1, SIZES[:3])
    runner = slide.SlideRunner(
        fake_predict,
        num_classes=N,
        crop=CROP,
        stride=STRIDE,
        mode="whole",
        batch=4,
        class_chunk=class_chunk,
    )
    for (_, labels, conf), (_, image, hw0) in zip(runner.run(data), data, strict=True):
        assert conf is None
        np.testing.assert_array_equal(labels, per_image(image, hw0, mode="whole")[0])
    assert runner.windows_run == 0


def test_class_chunks_keep_ties_and_the_large_vocabulary_off_the_accumulator(monkeypatch):
    """Chunks hand ties to the lower class id, as argmax does (duplicated logit columns: a
    class and its copy in another chunk tie everywhere), and never allocate [H, W, N]."""
    n = 7

    def predict(x):  # columns 5, 6 copy 0, 1: every pixel's best has a twin in a later chunk
        logits = fake_predict(x)
        return jnp.concatenate([logits, logits[..., :2]], axis=-1)

    data = images(5, SIZES[:2] + SIZES[4:5])
    runner = slide.SlideRunner(
        predict, num_classes=n, crop=CROP, stride=STRIDE, batch=4, class_chunk=2, confidence=True
    )
    allocated = []
    zeros = slide._zeros

    def recording_zeros(*, shape, num_classes):
        allocated.append(num_classes)
        return zeros(shape=shape, num_classes=num_classes)

    monkeypatch.setattr(slide, "_zeros", recording_zeros)
    out = list(runner.run(data))
    monkeypatch.undo()
    assert allocated and set(allocated) == {2}
    for (_, labels, conf), (_, image, hw0) in zip(out, data, strict=True):
        logits = slide_image.slide_inference(
            predict, image, num_classes=n, crop=CROP, stride=STRIDE
        )
        want_labels, want_conf = tiles.resize_to_labels(logits, hw0, confidence=True)
        np.testing.assert_array_equal(labels, np.asarray(want_labels))
        assert labels.max() < 5  # the copies never win
        np.testing.assert_allclose(conf, np.asarray(want_conf), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode, class_chunk", [("slide", 0), ("slide", 2), ("whole", 3)])
def test_traceable_slide_labels_equal_the_per_image_path(mode, class_chunk):
    """`slide_image.slide_labels` (what export compiles), jitted, class-chunked or not: the
    reference labels exactly, the confidence to rounding; ties go to the lower class id."""

    def predict(x):  # columns 5, 6 copy 0, 1: ties across chunks
        logits = fake_predict(x)
        return jnp.concatenate([logits, logits[..., :2]], axis=-1)

    for _, image, hw0 in images(6, [SIZES[0], SIZES[2], SIZES[4]]):
        fn = jax.jit(
            lambda im, hw0=hw0: slide_image.slide_labels(
                predict,
                im,
                hw0,
                num_classes=7,
                crop=CROP,
                stride=STRIDE,
                mode=mode,
                class_chunk=class_chunk,
                confidence=True,
            )
        )
        labels, conf = fn(image)
        logits = slide_image.slide_inference(
            predict, image, num_classes=7, crop=CROP, stride=STRIDE, mode=mode
        )
        want_labels, want_conf = tiles.resize_to_labels(logits, hw0, confidence=True)
        assert labels.shape == conf.shape == hw0 and labels.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(labels), np.asarray(want_labels))
        assert int(labels.max()) < 5  # the copies never win
        np.testing.assert_allclose(np.asarray(conf), np.asarray(want_conf), rtol=1e-6, atol=1e-7)


def test_bad_predict_fn_and_settings_are_named():
    with pytest.raises(ValueError, match="predict_fn must return"):
        list(
            slide.SlideRunner(lambda x: x, num_classes=N, crop=CROP, stride=CROP).run(
                images(2, SIZES[:1])
            )
        )
    with pytest.raises(ValueError, match="mode must be"):
        slide.SlideRunner(fake_predict, num_classes=N, crop=CROP, stride=CROP, mode="tiles")
    with pytest.raises(ValueError, match="batch must be"):
        slide.SlideRunner(fake_predict, num_classes=N, crop=CROP, stride=CROP, batch=0)
    with pytest.raises(ValueError, match="class_chunk must be"):
        slide.SlideRunner(fake_predict, num_classes=N, crop=CROP, stride=CROP, class_chunk=-1)


def test_many_image_sizes_compile_a_handful_of_programs():
    """40 images of 40 original sizes and 23 resized sizes: the per-image path compiles a model,
    an accumulation and a resize program per shape; the runner compiles per padded bucket."""
    rng = np.random.default_rng(3)
    sizes = []
    for i in range(40):
        long = int(rng.integers(CROP, 4 * CROP + 1))
        hw = (CROP, long) if i % 2 else (long, CROP)  # the short side resized to the crop
        hw0 = (hw[0] * 2 + i, hw[1] * 2 + 3 * i)
        sizes.append((i, (hw, hw0)))
    data = images(4, sizes)
    assert len({im.shape for _, im, _ in data}) >= 20
    buckets = {slide._bucket_side(max(im.shape[:2]), CROP) for _, im, _ in data}
    compiles = []

    def count(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(event)

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        runner = slide.SlideRunner(  # one device: XLA compiles a program for each device
            fake_predict,
            num_classes=N,
            crop=CROP,
            stride=STRIDE,
            batch=8,
            devices=jax.local_devices()[:1],
        )
        results = list(runner.run(data))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(results) == 40
    # The model (1); per bucket: the zero accumulators, the accumulation, the tiled resize (3).
    assert len(compiles) <= 1 + 3 * len(buckets), (len(compiles), len(buckets))
    assert len(compiles) < len(data)
