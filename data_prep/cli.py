"""The command line every converter shares: --src, --out, --workers, --shard-size.

`python -m data_prep.<dataset> --src DIR --out DATA_DIR` converts one dataset;
`python -m data_prep.prepare` converts several. Errors a user can fix (a wrong --src) are one
line and exit status 1.
"""

import sys
from collections.abc import Callable, Sequence

from absl import flags

from data_prep import convert
from larvseg_jax.errors import UserError

FLAGS = flags.FLAGS


flags.DEFINE_string("out", None, "Data root to write (config data.dir): holds larvseg_records/.")
flags.DEFINE_integer("workers", None, "Worker processes (default: all cores).")
flags.DEFINE_integer("shard-size", 1000, "Images per ArrayRecord shard (the unit of resume).")


def define_src_flag(what: str) -> None:
    """--src of a one-dataset converter (prepare.py names one flag per dataset instead)."""
    flags.DEFINE_string("src", None, f"The downloaded dataset: {what}.")


def run_converter(make_jobs: Callable[[str], Sequence[convert.SourceJob]]) -> None:
    """main() of a one-dataset converter: its jobs from --src."""
    if not FLAGS.src:
        sys.exit("--src is required: the folder of the downloaded dataset")
    run(lambda: make_jobs(FLAGS.src))


def run(make_jobs: Callable[[], Sequence[convert.SourceJob]]) -> list[convert.Summary]:
    """Lists every job first (so a wrong path fails before any work), then converts them."""
    if not FLAGS.out:
        sys.exit("--out is required: the data root to write (the configs' data.dir)")
    try:
        jobs = make_jobs()
        summaries = convert.convert_all(
            jobs, FLAGS.out, workers=FLAGS.workers, shard_size=FLAGS["shard-size"].value
        )
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print("\n".join(line for s in summaries for line in s.lines()))
    return summaries
