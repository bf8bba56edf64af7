"""Entry point: python main.py --config configs/<name>.py --workdir DIR [--mode ...] [--config.x=y]."""

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, eval JSON and TensorBoard go here.")
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])

USER_ERRORS = (FileNotFoundError, PermissionError, ValueError, KeyError)


def _quiet_libraries(record) -> bool:
    """Keeps our INFO lines; from orbax, tfds and grain only warnings and errors."""
    noisy = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")
    return record.levelno >= 30 or not any(p in record.pathname for p in noisy)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # a preemption (SIGTERM) saves a checkpoint like Ctrl-C


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from larvseg_jax import train  # after flag parsing: jax reads XLA_FLAGS at import

    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_libraries)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        if FLAGS.mode == "eval":
            report = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
        else:
            report = train.train_and_evaluate(
                FLAGS.config, FLAGS.workdir, do_eval=FLAGS.mode == "train_and_eval"
            )
    except KeyboardInterrupt:
        print(
            "interrupted: a checkpoint was saved; run the same command to resume", file=sys.stderr
        )
        sys.exit(130)
    except (train.TrainingError, *USER_ERRORS) as e:
        if os.environ.get("LARVSEG_TRACEBACK"):
            raise
        print(f"error: {e}  (LARVSEG_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    if report:
        print(
            f"step {report['step']}: mIoU {report['miou']:.2f}  base {report['miou_base']:.2f}  "
            f"novel {report['miou_novel']:.2f}  ({report['num_images']} images)"
        )


def parse_flags(argv):
    """absl's parser, but a bad --config.key override is one line, not a traceback."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # loads the config file now, so a missing file fails here
        return rest
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
        text = str(e).replace("\\n", "\n").replace("\\'", "'")
        text = " ".join(line.strip(" '\"") for line in text.splitlines() if line.strip(" '\""))
        print(f"error: bad command line: {text}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
