"""Reading the files of real datasets: images to RGB JPEG bytes, label maps to arrays.

Downloads are messy: ImageNet holds grayscale and CMYK JPEGs (and a few PNGs named .JPEG),
crawls leave truncated files. Every image is decoded in full here, so a broken one becomes a
`Reject` naming the file (the converter reports it and goes on) instead of a crash hours into
training. RGB JPEGs are stored as they are (no second lossy encoding); anything else is
converted to RGB and encoded once as JPEG (quality 95).
"""

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
JPEG_QUALITY = 95


class Reject(Exception):
    """An input that cannot become a record.

    Attributes:
      reason: a short category, the key of the conversion summary ("unreadable image", ...).
      path: the offending file.
      detail: what exactly is wrong and, where it helps, what to do.
    """

    def __init__(self, reason: str, path: str, detail: str):
        super().__init__(f"{path}: {reason}: {detail}")
        self.reason, self.path, self.detail = reason, path, detail


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _open(path: str, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()  # decodes every byte: truncated data raises here, not in training
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as e:
        raise Reject(f"unreadable {what}", path, f"{type(e).__name__}: {e}") from e
    return image


def read_rgb(path: str) -> tuple[bytes, tuple[int, int], str]:
    """An image as JPEG bytes of an RGB picture.

    Returns:
      (bytes, (height, width), note): note is "" for a stored RGB JPEG, else what was converted
      to an RGB JPEG (e.g. "JPEG CMYK").
    """
    image = _open(path, "image")
    size = (image.height, image.width)
    if image.format == "JPEG" and image.mode == "RGB":
        with open(path, "rb") as f:
            return f.read(), size, ""
    note = f"{image.format} {image.mode}"
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels over white, as viewers show them (not the undefined RGB under them).
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
    else:
        rgb = image.convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), size, note


def read_label(path: str) -> np.ndarray:
    """A single-channel label map (PNG uint8, TIFF uint16) as a 2-D integer array."""
    if not os.path.exists(path):
        raise Reject("missing label", path, "the image has no label file")
    image = _open(path, "label")
    label = np.asarray(image)
    if label.ndim != 2:
        raise Reject(
            "label not single-channel",
            path,
            f"mode {image.mode}, shape {label.shape}: expected one channel of class ids",
        )
    return label


def check_label(
    label: np.ndarray, image_size: tuple[int, int], path: str, valid: np.ndarray
) -> None:
    """Rejects a label map whose size differs from its image or that holds unknown values.

    Args:
      label: [H, W] stored values.
      image_size: (H, W) of the image.
      path: the label file (for the report).
      valid: bool lookup over stored values: valid[v] is True for a class id or an ignore code.
    """
    if label.shape != tuple(image_size):
        raise Reject(
            "label size differs from image",
            path,
            f"label {label.shape[0]}x{label.shape[1]}, image {image_size[0]}x{image_size[1]}",
        )
    values = np.unique(label)
    bad = values[(values < 0) | (values >= len(valid))]
    if bad.size == 0:
        bad = values[~valid[values]]
    if bad.size:
        raise Reject(
            "label values outside the class table",
            path,
            f"values {bad[:8].tolist()} are neither class ids nor ignore codes",
        )
