"""`python -m larvseg_jax.export` and `larvseg_jax.exported`: the loaded function runs without
flax or the training code and reproduces the in-process prediction exactly, for batch sizes 1
and 3."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from larvseg_jax import export, exported

ROOT = pathlib.Path(__file__).resolve().parents[1]
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")

# Runs where only the exported model is meant to be needed: first the loaded function (and a
# check that flax, orbax and the training code stayed out), then, for the comparison only, the
# in-process prediction of the same checkpoint.
CHECK = """
import json, sys
import jax
import numpy as np
from PIL import Image
from larvseg_jax import exported
model_dir, workdir, out, photos = sys.argv[1:]
model = exported.load(model_dir)
h, w = model.image_size
images = np.stack([
    np.asarray(Image.open(f"tests/fixtures/images/{n}").convert("RGB").resize((w, h)))
    for n in photos.split(",")
])
three, one = model(images), model(images[:1])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("flax", "orbax", "optax", "grain")
                or m in ("larvseg_jax.train", "larvseg_jax.experiment", "larvseg_jax.models"))
from larvseg_jax import inference
predictor = inference.load(workdir)
index = predictor.index(model.classes)
reference = [predictor.segment(image, index) for image in images]
np.savez(out, labels3=three[0], conf3=three[1], labels1=one[0], conf1=one[1],
         want_labels=np.stack([r.labels for r in reference]),
         want_conf=np.stack([r.confidence for r in reference]))
print(json.dumps({"loaded": loaded}))
"""


@pytest.fixture(scope="module")
def model_dir(smoke_ca_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    code = export.run(
        [
            "--workdir",
            str(smoke_ca_run),
            "--out",
            str(out),
            "--image-size",
            "48",
            "60",
            "--classes",
            "sky,water,boat,sand,grass",
        ]
    )
    assert code == 0
    return out


def test_the_model_directory_is_complete_and_self_describing(model_dir):
    assert sorted(os.listdir(model_dir)) == [
        "classes.txt",
        "export.json",
        "model.jaxexport",
        "params.npz",
    ]
    info = json.loads((model_dir / "export.json").read_text())
    assert info["image_size"] == [48, 60] and info["batch"] == "any" and info["step"] == 6
    assert info["vocabulary"] == {"source": "--classes", "num_classes": 5}
    assert (model_dir / "classes.txt").read_text().split() == [
        "sky",
        "water",
        "boat",
        "sand",
        "grass",
    ]


def test_the_loaded_function_runs_without_the_training_code_and_matches_exactly(
    model_dir, smoke_ca_run, tmp_path
):
    out = tmp_path / "result.npz"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK,
            str(model_dir),
            str(smoke_ca_run),
            str(out),
            ",".join(PHOTOS),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["loaded"] == []
    r = np.load(out)
    assert r["labels3"].shape == (3, 48, 60) and r["labels3"].dtype == np.int32
    np.testing.assert_array_equal(r["labels3"], r["want_labels"])
    np.testing.assert_array_equal(r["labels1"], r["want_labels"][:1])
    np.testing.assert_allclose(r["conf3"], r["want_conf"], atol=1e-6)
    np.testing.assert_allclose(r["conf1"], r["conf3"][:1], atol=1e-6)
    assert r["labels3"].max() < 5


def test_wrong_inputs_say_what_the_model_takes(model_dir, tmp_path):
    model = exported.load(str(model_dir))
    with pytest.raises(
        ValueError, match=r"must be uint8 \[B, 48, 60, 3\]; got uint8 \(1, 48, 61, 3\)"
    ):
        model(np.zeros((1, 48, 61, 3), np.uint8))
    with pytest.raises(ValueError, match="add a batch axis"):
        model(np.zeros((48, 60, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="holds no exported model"):
        exported.load(str(tmp_path))


def test_a_vocabulary_over_the_class_chunk_exports_the_chunked_path(predictor):
    """eval.class_chunk below the vocabulary size: the exported computation accumulates a chunk
    of classes at a time (no [H, W, N] array; what an 11K-class export needs) and gives the
    unchunked export's labels and, to rounding, its confidence."""
    from PIL import Image

    names = ["sky", "water", "boat", "sand", "grass"]
    index = predictor.index(names)
    rgb = np.stack(
        [
            np.asarray(
                Image.open(ROOT / "tests/fixtures/images" / n).convert("RGB").resize((60, 48))
            )
            for n in PHOTOS[:2]
        ]
    )
    outputs, before = {}, predictor.cfg.eval.class_chunk
    for chunk in (0, 2):
        predictor.cfg.eval.class_chunk = chunk
        fn, weights = export.inference_function(predictor, index, (48, 60))
        assert ("chunk_labels" in str(jax.make_jaxpr(fn)(weights, rgb))) == bool(chunk)
        outputs[chunk] = [np.asarray(a) for a in jax.jit(fn)(weights, rgb)]
    predictor.cfg.eval.class_chunk = before
    np.testing.assert_array_equal(outputs[2][0], outputs[0][0])
    np.testing.assert_allclose(outputs[2][1], outputs[0][1], rtol=1e-6, atol=1e-7)
