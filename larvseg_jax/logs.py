"""Library log lines a user should not have to read: one place for main.py and the CLIs."""

import logging

# Benign library lines printed on every run; one clean line per event is the goal.
BENIGN = (
    "Unable to initialize backend 'tpu'",  # jax probing for a TPU on a CPU/GPU machine
    "Using custom data configuration",  # tfds, once per source opened
    "OpenCV is not installed",  # tfds: PIL decodes our PNG/JPEG records fine
)
NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/", "/jax/_src/")


def not_benign(record: logging.LogRecord) -> bool:
    return not any(text in str(record.msg) for text in BENIGN)


def quiet_libraries(record: logging.LogRecord) -> bool:
    """Keeps our INFO lines; from orbax, tfds and grain only warnings and errors; no BENIGN."""
    if record.levelno < logging.WARNING and any(p in record.pathname for p in NOISY):
        return False
    return not_benign(record)


def quiet_benign() -> None:
    """For the command-line tools (no absl app): drops the BENIGN lines libraries log through
    absl (tfds's OpenCV notice when an evaluation set is read)."""
    absl_logger = logging.getLogger("absl")
    if not_benign not in absl_logger.filters:
        absl_logger.addFilter(not_benign)
