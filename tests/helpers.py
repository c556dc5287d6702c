"""Helpers the tests share: the repository root, config loading, skip markers."""

import importlib.util
import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))
FASHION_MNIST_DIR = os.environ.get(
    "PTQ_ADVERSARY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"
)

requires_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)",
)


#: Tests whose subject is an XLA:CPU feature (forced host device counts): skipped with this
#: reason on an accelerator (experiments/accelerator_check.sh runs the suite there).
requires_cpu = pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="forces N host devices with XLA_FLAGS=--xla_force_host_platform_device_count, an "
    "XLA:CPU feature; on an accelerator it would test the CPU, not the device",
)


def load_config(path: pathlib.Path, arg: str | None = None):
    """Loads ``get_config(arg)`` from a config file, as config_flags does."""
    spec = importlib.util.spec_from_file_location(f"cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)
