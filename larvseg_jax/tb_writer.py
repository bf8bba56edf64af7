"""TensorBoard event writer without TensorFlow: scalars, images, text (STYLE 1, ENVIRONMENT 2).

Uses the `tensorboard` package's pure-Python EventFileWriter and bundled protos, and Pillow for
PNG. clu's writers import TensorFlow, which this project never does.
"""

import io
import os
import time
from collections.abc import Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer.event_file_writer import EventFileWriter

_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
    data_class=summary_pb2.DATA_CLASS_SCALAR,
)


def _png(image: np.ndarray) -> summary_pb2.Summary.Image:
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return summary_pb2.Summary.Image(
        height=image.shape[0],
        width=image.shape[1],
        colorspace=3 if image.ndim == 3 else 1,
        encoded_image_string=buf.getvalue(),
    )


class TensorBoardWriter:
    """Writes one event file under `logdir`; every method is a no-op when not `enabled`.

    Multi-process runs pass `enabled=jax.process_index() == 0` so only one process writes.

    Args:
      logdir: directory for the event file (created on the enabled process).
      enabled: whether this process writes anything.
    """

    def __init__(self, logdir: str | os.PathLike, enabled: bool = True):
        self._writer = EventFileWriter(os.fspath(logdir)) if enabled else None

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        if values:
            summary = summary_pb2.Summary(value=values)
            self._writer.add_event(
                event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Scalars, TF2-style (a float tensor + `scalars` plugin metadata, as tf.summary writes)."""
        if not self.enabled:
            return
        values = []
        for tag, value in scalars.items():
            tensor = tensor_pb2.TensorProto(
                dtype=types_pb2.DT_FLOAT,
                float_val=[float(value)],
                tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            )
            values.append(
                summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=_SCALAR_METADATA)
            )
        self._add(step, values)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """PNG images: uint8 (or float in [0, 1]) [H, W, 3|1] or a batch [B, H, W, 3|1].

        A batch of B > 1 images is written under tags `<name>/0` ... `<name>/<B-1>`.
        """
        if not self.enabled:
            return
        values = []
        for tag, array in images.items():
            array = np.asarray(array)
            if array.ndim == 3:
                array = array[None]
            if array.ndim != 4 or array.shape[-1] not in (1, 3):
                raise ValueError(
                    f"image {tag!r}: want [H, W, 3] or [B, H, W, 3], got {array.shape}"
                )
            for i, image in enumerate(array):
                name = tag if len(array) == 1 else f"{tag}/{i}"
                values.append(summary_pb2.Summary.Value(tag=name, image=_png(image)))
        self._add(step, values)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Text (markdown) for TensorBoard's text dashboard."""
        if not self.enabled:
            return
        metadata = text_metadata.create_summary_metadata(display_name=None, description=None)
        values = []
        for tag, text in texts.items():
            tensor = tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                string_val=[str(text).encode()],
                tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            )
            values.append(summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=metadata))
        self._add(step, values)

    def flush(self) -> None:
        if self.enabled:
            self._writer.flush()

    def close(self) -> None:
        if self.enabled:
            self._writer.close()
            self._writer = None
