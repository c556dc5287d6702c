"""Fakes the analysis and report tests share: a synthetic dataset and pipeline runs on disk.

:func:`make_fake_run` writes a pipeline workdir with the pairs' artifacts (an untrained tiny cnn
and a perturbed policy per mode) and a ``results.json`` (no training), so the analyses and the
report run end to end in seconds.
"""

import json
import os

import jax
import numpy as np
from flax import nnx

from ptq_adversary import artifacts, data, models

CHOICES = (2, 3, 4, 5, 6, 8)
WIDTHS = (4, 4, 8, 8)


def tiny_dataset(n_test: int = 40, size: int = 16, seed: int = 0) -> data.Dataset:
    """A synthetic 10-class dataset of ``size``-pixel grey images (no files needed)."""
    rng = np.random.default_rng(seed)

    def split(n):
        images = np.zeros((n, size, size, 1), np.uint8)
        labels = (np.arange(n) % 10).astype(np.int32)
        for i, y in enumerate(labels):  # a bright square whose place depends on the class
            r, c = 2 + (y % 5) * (size // 8), 2 + (y // 5) * (size // 3)
            images[i, r : r + 4, c : c + 5, 0] = 120 + 12 * y
        images = np.clip(images + rng.integers(0, 40, images.shape), 0, 255).astype(np.uint8)
        return data.Split(images=images, labels=labels)

    return data.Dataset(
        name="fashion_mnist", train=split(20), val=split(10), test=split(n_test),
        num_classes=10, image_shape=(size, size, 1),
        class_names=tuple(f"class{i}" for i in range(10)),
        mean=np.asarray([0.3], np.float32), std=np.asarray([0.3], np.float32),
    )  # fmt: skip


def save_tiny_pair(pair_dir: str, seed: int) -> None:
    """Writes ``pair_dir/best/{model,policy}``: an untrained tiny cnn and a non-trivial policy."""
    model = models.create_model(
        "cnn", num_classes=10, in_channels=1, rngs=nnx.Rngs(seed), widths=WIDTHS
    )
    _, params, rest = models.split_model(model)
    spec = artifacts.ModelSpec("cnn", 10, 1, 8, {"widths": WIDTHS})
    artifacts.save_model(os.path.join(pair_dir, "best", "model"), spec, params, rest)
    pspec = artifacts.PolicySpec(num_sites=4, in_channels=1, choices=CHOICES, budget=4.0,
                                 widths=(4,))  # fmt: skip
    _, pparams, prest = nnx.split(artifacts.build_policy(pspec, seed), nnx.Param, ...)
    # The policy head starts at zero (every input the same allocation); perturb it so that
    # allocations differ between sites and inputs.
    rng = np.random.default_rng(seed)
    pparams = jax.tree.map(lambda x: x + 2.0 * rng.standard_normal(x.shape, np.float32), pparams)
    artifacts.save_policy(os.path.join(pair_dir, "best", "policy"), pspec, pparams, prest)


def fake_results(seed: int) -> dict:
    """A pipeline ``results.json`` with the schema of docs/OUTPUTS.md and seed-dependent numbers."""
    pair = lambda fp, q: {
        "fp_accuracy": fp, "dptq_accuracy": q, "drop": 100 * (fp - q),
        "uniform_drop": 1.0 + seed, "random_drop": 5.0 + seed, "flip_rate": fp - q + 0.01,
        "mean_bits": 4.0, "budget": 4.0,
    }  # fmt: skip
    return {
        "dataset": "fashion_mnist", "teacher_model": "teacher_cnn", "student_model": "cnn",
        "choices": list(CHOICES), "budget": 4.0,
        "teacher": {"test_accuracy": 0.91 + 0.001 * seed},
        "student": {"test_accuracy": 0.89 + 0.001 * seed},
        "pairs": {"robust": pair(0.89, 0.888 - 0.001 * seed),
                  "detrimental": pair(0.88, 0.10 + 0.01 * seed)},
        "max_fp_gap_points": 0.3 + 0.1 * seed,
    }  # fmt: skip


def make_fake_run(run_dir: str, seed: int, modes=("robust", "detrimental")) -> None:
    """A pipeline workdir with the pairs' artifacts and a results.json (no training)."""
    for mode in modes:
        save_tiny_pair(os.path.join(run_dir, mode), seed=10 * seed + (mode == "detrimental"))
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(fake_results(seed), f)
