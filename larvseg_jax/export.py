"""Export a trained model as a self-contained inference function (jax.export / StableHLO).

  python -m larvseg_jax.export --workdir runs/larvseg --out model_dir --image-size 512 683 \
      [--classes "boat,water,sky" | --vocab names.txt | --dataset a150] [--step N]

model_dir holds model.jaxexport (the serialized function: uint8 images [B, H, W, 3] at
--image-size, any batch size B, -> labels and confidence [B, H, W]; the evaluation resize,
normalisation, slide windows and vocabulary are inside it), params.npz (its weights),
classes.txt and export.json (written last). `larvseg_jax.exported.load(model_dir)` runs it with
jax and numpy only.
"""

import argparse
import os
import shutil
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from larvseg_jax import exported, slide_image
from larvseg_jax.data import transforms
from larvseg_jax.errors import UserError
from larvseg_jax.inference import Predictor, load
from larvseg_jax.jsonfile import write_json_atomic
from larvseg_jax.segment import add_model_flags, add_vocabulary_flags, choose_vocabulary


def inference_function(predictor: Predictor, index: np.ndarray, image_size: tuple[int, int]):
    """(fn, weights): fn(weights, uint8 [B, H, W, 3]) -> (int32 [B, H, W], float32 [B, H, W]),
    the computation of `Predictor.segment` for images of `image_size`, traceable for export;
    vocabularies over eval.class_chunk classes go through the class-chunked path."""
    cfg, (h0, w0) = predictor.cfg, image_size
    short = int(cfg.eval.short_side)
    new_h, new_w = transforms.rescale_size(h0, w0, (4 * short, short))
    weights, treedef = jax.tree.flatten(predictor.params)
    index = np.asarray(index, np.int32)
    # Pure-XLA attention and GEMMs: an artifact must not call the kernels compiled on this machine
    # (jax.export refuses such custom calls, and the machine that loads it may have none).
    backbone = predictor.model.backbone.clone(attention="custom_vjp", gemm="xla")
    model = predictor.model.clone(backbone=backbone)

    def one_image(params, rgb):
        image = transforms.resize_bilinear(rgb, new_h, new_w, xp=jnp)
        image = (image - transforms.MEAN) / transforms.STD

        def predict_fn(images):
            return model.apply({"params": params}, images, index, train=False)[0]

        return slide_image.slide_labels(
            predict_fn,
            image,
            (h0, w0),
            num_classes=len(index),
            crop=int(cfg.eval.crop_size),
            stride=int(cfg.eval.stride),
            mode=cfg.eval.mode,
            class_chunk=predictor.class_chunk,
            confidence=True,
        )

    def fn(weights, images):
        params = jax.tree.unflatten(treedef, weights)
        return jax.vmap(lambda rgb: one_image(params, rgb))(images)

    return fn, [np.asarray(w) for w in weights]


def export(predictor, index, image_size, *, batch: str | int = "b") -> jax.export.Exported:
    """The serialized-ready function; `batch` a symbol name (any batch size) or a fixed int."""
    fn, weights = inference_function(predictor, index, image_size)
    (b,) = jax.export.symbolic_shape(batch) if isinstance(batch, str) else (batch,)
    images = jax.ShapeDtypeStruct((b, *image_size, 3), jnp.uint8)
    specs = [jax.ShapeDtypeStruct(w.shape, w.dtype) for w in weights]
    return jax.export.export(jax.jit(fn))(specs, images), weights


def write(out: str, exp: jax.export.Exported, weights, names, info: dict) -> None:
    """Writes the model directory; export.json last, and the whole folder renamed into place."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export_", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would follow the folder into place
    try:
        with open(os.path.join(tmp, "model.jaxexport"), "wb") as f:
            f.write(exp.serialize())
        np.savez(os.path.join(tmp, "params.npz"), **{f"p{i}": w for i, w in enumerate(weights)})
        with open(os.path.join(tmp, "classes.txt"), "w") as f:
            f.write("".join(f"{n}\n" for n in names))
        write_json_atomic(os.path.join(tmp, "export.json"), info)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m larvseg_jax.export",
        description="Export a trained LarvSeg-JAX model as a jax.export inference function.",
    )
    add_model_flags(parser)
    parser.add_argument("--out", required=True, help="model directory to write (replaced)")
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("H", "W"),
        help="input image size (default: the evaluation short side, square)",
    )
    add_vocabulary_flags(parser)
    return parser.parse_args(argv)


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        predictor = load(args.workdir, step=args.step, checkpoint=args.checkpoint)
        names, source = choose_vocabulary(predictor, args)
        size = tuple(args.image_size or (predictor.cfg.eval.short_side,) * 2)
        if min(size) < 1:
            raise UserError(f"--image-size {size}: both sides must be >= 1")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    exp, weights = export(predictor, predictor.index(names), size)
    info = {
        "format": exported.FORMAT,
        "image_size": list(size),
        "batch": "any",
        "checkpoint": predictor.checkpoint,
        "step": predictor.step,
        "model": predictor.cfg.model.variant,
        "vocabulary": {"source": source, "num_classes": len(names)},
        "platforms": list(exp.platforms),
        "jax_version": jax.__version__,
    }
    write(args.out, exp, weights, names, info)
    size_mb = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)) / 1e6
    print(
        f"exported {predictor.checkpoint} ({len(names)} classes, {size[0]}x{size[1]} images, any "
        f"batch size) to {args.out} ({size_mb:.1f} MB)",
        file=sys.stderr,
    )
    return 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
