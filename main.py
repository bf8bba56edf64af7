"""Entry point: python main.py --config configs/<name>.py --workdir DIR [--mode ...] [--config.x=y]."""

import ast
import difflib
import importlib.util
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from larvseg_jax import host_malloc, logs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, eval JSON and TensorBoard go here.")
flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"], "What to run.")
flags.DEFINE_string(
    "coordinator",
    None,
    "Multi-process runs: HOST:PORT of process 0, with --num_processes and --process_id "
    "(or 'auto' on a TPU slice / under SLURM).",
)
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process, 0..num_processes-1.")

CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")
COMMON_KEYS = (
    ("train.total_steps", "steps to train (320000 in the paper)"),
    ("data.dir", "folder holding larvseg_records/ (data_prep/ writes it)"),
    ("data.sources.<name>.weight", "a source's loss weight (λcls); also .ca_weight, .ratio, .crop"),
    ("model.pretrained", "AugReg ViT-B/16 .npz to start from"),
    ("ca.enabled", "CA-classifier on/off; ca.memory_size (M), ca.topk (K)"),
    ("optim.lr", "SGD base learning rate"),
    ("data.num_groups", "virtual devices per step (a multiple of the device count)"),
    ("eval.step", "checkpoint step for --mode eval (-1 = latest)"),
    ("train.accumulate_gradients", "one group's activations at a time (less memory)"),
    ("model.remat", "recompute transformer blocks in the backward pass (less memory)"),
)
USAGE = (
    "python main.py --config configs/<name>.py[:arg] --workdir DIR "
    "[--mode train|eval|train_and_eval] [--config.KEY=VALUE ...]"
)


def config_summaries() -> list[tuple[str, str]]:
    """(path, first docstring line) of every config, read without importing it."""
    out = []
    for path in sorted(CONFIGS.glob("*.py")):
        if path.name in ("__init__.py", "paper.py"):
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        out.append((f"configs/{path.name}", doc.strip().splitlines()[0] if doc.strip() else ""))
    return out


def help_text() -> str:
    width = max(len(p) for p, _ in config_summaries())
    lines = [f"usage: {USAGE}", "", "Trains and evaluates LarvSeg (PRCV 2024) in JAX.", ""]
    lines += [
        "flags:",
        "  --config    an experiment file below; `:arg` passes a sweep argument",
        "  --workdir   checkpoints, eval JSON and TensorBoard; re-running resumes",
        "  --mode      train_and_eval (default) | train | eval (restores a checkpoint)",
        "  --coordinator HOST:PORT --num_processes N --process_id I",
        "              one process per host: the same command on every host (or",
        "              --coordinator=auto on a TPU slice / under SLURM)",
        "",
        "configs:",
    ]
    lines += [f"  {path:<{width}}  {doc}" for path, doc in config_summaries()]
    lines += ["", "most used keys (--config.KEY=VALUE; configs/base.py lists every key):"]
    lines += [f"  {key:<28}  {what}" for key, what in COMMON_KEYS]
    lines += ["", "LARVSEG_TRACEBACK=1 shows the traceback of a one-line error."]
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(logs.quiet_libraries)
    host_malloc.keep_freed_memory(FLAGS.config.model.variant)  # LARVSEG_MALLOC=keep; before JAX
    from larvseg_jax import distributed, interrupts, train  # after flags: jax reads XLA_FLAGS
    from larvseg_jax.errors import UserError

    interrupts.install()  # Ctrl-C and SIGTERM (preemption) stop at the next safe point
    try:
        distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
        if FLAGS.mode == "eval":
            report = train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
        else:
            report = train.train_and_evaluate(
                FLAGS.config, FLAGS.workdir, do_eval=FLAGS.mode == "train_and_eval"
            )
    except train.Interrupted as e:
        print(e.message(), file=sys.stderr)
        sys.exit(interrupts.exit_code(e))
    except UserError as e:
        if os.environ.get("LARVSEG_TRACEBACK"):
            raise
        print(f"error: {e}  (LARVSEG_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    if report:
        print(summary_line(report))


def summary_line(report: dict) -> str:
    """The last line of a run: its means (n/a where a mean covers no class)."""

    def pct(key):
        return "n/a" if report.get(key) is None else f"{report[key]:.2f}"

    return (
        f"step {report['step']}: mIoU {pct('miou')}  base {pct('miou_base')}  "
        f"novel {pct('miou_novel')}  hIoU {pct('hiou')}  ({report['num_images']} images)"
    )


def _fail(message: str) -> None:
    print(f"error: {message}\nusage: {USAGE}\n(--help lists the configs)", file=sys.stderr)
    sys.exit(2)


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _check_config_file(spec: str):
    """Loads `path[:arg]` once, so a missing file or a bad argument is one line, not a traceback."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        _fail(f"config file {path!r} not found")
    module_spec = importlib.util.spec_from_file_location("_larvseg_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg or None)
    except (ValueError, KeyError, TypeError) as e:
        _fail(f"{path}: {e}")


def _bad_key_hint(cfg, argv) -> str:
    """`--config.KEY: no such key` with the closest known key, for the first unknown KEY."""
    known = _flat_keys(cfg)
    for arg in argv[1:]:
        key = arg.split("=")[0].removeprefix("--config.")
        if arg.startswith("--config.") and key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            return f"--config.{key}: no such key{hint} (configs/base.py lists every key)"
    return ""


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys += _flat_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [f"{prefix}{k}"]
    return keys


def parse_flags(argv):
    """absl's parser with one-line errors and a --help that lists the configs (exit 0)."""
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(help_text())
        sys.exit(0)
    path = _config_path(argv)
    if path is None:
        _fail("--config is required")
    cfg = _check_config_file(path)
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # loads the config file now
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError, OSError) as e:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        text = _bad_key_hint(cfg, argv) or text
        _fail(f"bad command line: {text}")
    if not FLAGS.workdir:
        _fail("--workdir is required")
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
