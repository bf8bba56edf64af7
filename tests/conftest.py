"""Test setup: 8 simulated CPU devices (set before JAX starts) and shared paths."""

import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

# Generated synthetic worlds are cached per knobs; tests share one cache, never ~/.cache.
os.environ.setdefault("LARVSEG_CACHE", tempfile.mkdtemp(prefix="larvseg_test_cache_"))
# Many tests (and their subprocesses, which inherit these) compile the same programs: XLA's
# persistent cache compiles each once per session. Identical programs give identical results.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["LARVSEG_CACHE"], "xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# Tiny programs: XLA's optimisations cost more compile time than they save. As an environment
# variable it also reaches the subprocesses (main.py runs of the interrupt, fault, resume and
# multi-process tests), 7.7 instead of 10.7 s for a smoke run.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
GOLDENS = TESTS / "goldens"  # outputs of the official PyTorch code (goldens/README.md)
FIXTURES = TESTS / "fixtures"  # real photographs, bad files, upstream class lists (README.md)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run real-size (ViT-B/16) tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def goldens_dir() -> pathlib.Path:
    return GOLDENS


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    return FIXTURES


@pytest.fixture(scope="session")
def smoke_ca_run(tmp_path_factory) -> pathlib.Path:
    """A workdir with the smoke config trained and evaluated to its end with the CA-classifier
    (M=2, K=4): a tiny LarvSeg model for the inference tests (segment, export, demo) and the
    attention panels of evaluation."""
    from configs import smoke
    from larvseg_jax import train

    cfg = smoke.get_config()
    cfg.ca.enabled, cfg.ca.memory_size, cfg.ca.topk = True, 2, 4
    path = tmp_path_factory.mktemp("smoke_ca_run")
    train.train_and_evaluate(cfg, str(path))
    return path


@pytest.fixture(scope="module")
def workdir(smoke_ca_run) -> pathlib.Path:
    """The trained smoke LarvSeg run, for the modules that segment with it."""
    return smoke_ca_run


@pytest.fixture(scope="module")
def predictor(workdir):
    """`smoke_ca_run` restored for inference, once per module (tests may change its cfg)."""
    from larvseg_jax import inference

    return inference.load(str(workdir))
