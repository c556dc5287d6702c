"""Legacy equivalence: the bit-threading models of 1dbe6eb == zoo + transform, same weights.

Until commit 1dbe6eb the project's models were built from a layer library that threaded the
bit-widths through every call (``ptq_adversary/layers.py`` and the classes of
``ptq_adversary/models.py`` there: ``model(x, bits)``). They were replaced by plain
``flax.nnx`` networks (:mod:`ptq_adversary.models.zoo`) and a program transformation
(:mod:`ptq_adversary.transform`) that finds the quantization sites in the traced program,
reached through ``models.create_model`` / ``models.apply_model``. This script proves that, on
the same weights, the new code computes what the old code computed, for every registry model:

(a) full precision, inference mode: legacy ``old(x)`` vs ``apply_model(g, p, r, x)``;
(b) quantized, inference mode: legacy ``old(x, bits)`` vs ``apply_model(g, p, r, x, bits)``
    for int ``bits [B, L]`` (three draws with every entry uniform over {2, 3, 4, 5, 6, 8},
    i.e. a different allocation per example, plus all-2 and all-8), with weight_bits 8 and
    with weight_bits None (full-precision weights);
(c) the sites: ``num_sites`` equal and the names in the same order, legacy
    ``stage{i}.block{j}.X`` being new ``layer{i}/{j-1}/X`` (``conv2``, ``fc``, ``head`` the
    same in both). The per-site bits of (b) differ between sites, so a wrong order would also
    show up as a difference there.

The legacy code is not imported from the working tree (those files are deleted there): it is
materialized from git (``git show 1dbe6eb:ptq_adversary/{layers,models,quant}.py``) into a
temporary package ``legacy_ptq`` whose imports are rewritten to point into it, so the old
side is entirely the code of that commit (``--current-quant`` uses the working tree's
``ptq_adversary.quant`` for the old models instead). The legacy models' Variables are
randomized (kernels = He/LeCun init x U(0.5, 1.5), BatchNorm scales U(0.5, 1.5), biases
0.3 N(0, 1)); the BatchNorm running statistics are then calibrated on a separate batch (one
training-mode pass with momentum 0, i.e. mean / variance = that batch's statistics, positive),
so that activations keep a realistic scale through every depth; the state is then copied into
the new network by :func:`port_legacy_state` (moved here from ``zoo.py``), which walks both
structures explicitly and refuses mismatched architectures and left-over Variables.

Inputs: the 28x28x1 models (``cnn``, ``teacher_cnn``) see the first 64 images of the real
Fashion-MNIST test split (normalized with the train mean / std 0.2860 / 0.3530; calibration:
the first 256 train images), read by ``ptq_adversary.data`` from Debian's
dataset-fashion-mnist (falling back to random images, said in the output, if it is not
installed); the 32x32x3 models (``resnet18``, ``resnet20``, ``wrn16_4``, all at full width)
see standard-normal random images (calibration: another 256). 10 classes everywhere.

Pass criteria (``--check``, the default, exits with 1 if any fails):

* every case: ``max |old - new| <= 1e-4 * max(1, max |old|)`` over the logits and 100% argmax
  agreement (FP, and quantized for every allocation, weight_bits 8 and None);
* the same number of sites and the same names in the same order (mapping above);
* controls > 0, so that the equalities are not vacuous: quantized vs FP logits, all-2 vs FP,
  weight_bits 8 vs None, and old vs new with the bits columns reversed all differ;
* before the models, :func:`check_porter` makes sure the porting refuses mismatched
  architectures and left-over Variables.

The tolerance leaves room for a backend fusing the two programs differently (a quantizer
rounds, so a last-bit difference could move one activation to the next level). Measured on
XLA:CPU (2026-12-01): every case is bit-identical, max |old - new| = 0.0 for all five models,
FP and quantized, with either quant.py.

Command (from the repository root)::

    python experiments/legacy_equivalence.py            # all models at full width, --check
    python experiments/legacy_equivalence.py --models cnn resnet20 --no-check --current-quant

(``.venv/bin/python`` in this checkout). It writes
``experiments/results/legacy_equivalence/legacy_equivalence.{md,json}`` (``--out DIR``
elsewhere) and prints the markdown table. Runtime, all five models at full width, batch 64,
compiles included, on 2 AMD EPYC cores (jax 0.10.2, XLA:CPU), three runs on 2026-12-01:
97-180 s wall (the slow end with other jobs on the machine, load average ~5), of which
resnet18 (11.2 M parameters) 40-78 s; peak RSS 1.6 GB.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import bench_lib  # noqa: E402
import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ptq_adversary import data, models  # noqa: E402
from ptq_adversary.models import zoo  # noqa: E402

LEGACY_COMMIT = "1dbe6eb"
LEGACY_PACKAGE = "legacy_ptq"
OUT_DIR = REPO / "experiments" / "results" / "legacy_equivalence"
CHOICES = (2, 3, 4, 5, 6, 8)
NUM_CLASSES = 10
BATCH = 64
CALIBRATION = 256
RANDOM_ALLOCATIONS = 3
#: ``max |old - new| <= REL_TOL * max(1, max |old|)`` (per case), and agreement 100%.
REL_TOL = 1e-4
#: Fashion-MNIST train mean / std (tests/data/test_fashion_mnist.py checks them).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530

#: (registry name, in_channels, image size, architecture kwargs): the registry at full size.
MODELS: list[tuple[str, int, int, dict[str, Any]]] = [
    ("cnn", 1, 28, {}),
    ("teacher_cnn", 1, 28, {}),
    ("resnet18", 3, 32, {}),
    ("resnet20", 3, 32, {}),
    ("wrn16_4", 3, 32, {}),
]


# --- The legacy code, from git.


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout


def load_legacy(tmp: pathlib.Path, *, current_quant: bool = False) -> tuple[Any, str]:
    """Materializes the legacy layer library into ``tmp/legacy_ptq`` and imports its models.

    Args:
      tmp: an empty directory (put on ``sys.path``).
      current_quant: import ``ptq_adversary.quant`` of the working tree in the legacy layers
        instead of the commit's ``quant.py``.

    Returns:
      ``(legacy models module, full commit hash)``.
    """
    commit = _git("rev-parse", f"{LEGACY_COMMIT}^{{commit}}").strip()
    pkg = tmp / LEGACY_PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f'"""ptq_adversary layers/models at {commit}."""\n')
    files = ["layers", "models"] + ([] if current_quant else ["quant"])
    for name in files:
        src = _git("show", f"{commit}:ptq_adversary/{name}.py")
        src = src.replace(
            "from ptq_adversary.layers import", f"from {LEGACY_PACKAGE}.layers import"
        )
        if not current_quant:
            src = src.replace(
                "from ptq_adversary.quant import", f"from {LEGACY_PACKAGE}.quant import"
            )
        imports = re.findall(r"^\s*(?:from|import)\s+(ptq_adversary\S*)", src, flags=re.M)
        allowed = {"ptq_adversary.quant"} if current_quant else set()
        if set(imports) - allowed:
            raise RuntimeError(f"{name}.py at {commit} still imports {sorted(set(imports))}")
        (pkg / f"{name}.py").write_text(src)
    sys.path.insert(0, str(tmp))
    importlib.invalidate_caches()
    legacy = importlib.import_module(f"{LEGACY_PACKAGE}.models")
    layers = importlib.import_module(f"{LEGACY_PACKAGE}.layers")
    assert legacy.BasicBlock is layers.BasicBlock and layers.__file__.startswith(str(tmp))
    quant_module = "ptq_adversary.quant" if current_quant else f"{LEGACY_PACKAGE}.quant"
    assert layers.fake_quant_activation.__module__ == quant_module
    return legacy, commit


# --- Porting weights from the bit-threading layer library (formerly in ptq_adversary.zoo).


def _canonical_padding(padding: Any) -> Any:
    return padding if isinstance(padding, str) else tuple(map(tuple, padding))


class _Porter:
    """Copies Variables old -> new pairwise, remembering which ones it has touched."""

    def __init__(self):
        self.old_seen: set[int] = set()
        self.new_seen: set[int] = set()

    def var(self, old: Any, new: Any, where: str) -> None:
        if not isinstance(old, nnx.Variable) or not isinstance(new, nnx.Variable):
            raise ValueError(f"{where}: expected two nnx.Variables, got {type(old)}, {type(new)}")
        if type(old) is not type(new):
            raise ValueError(f"{where}: variable types differ: {type(old)} vs {type(new)}")
        value = old.get_value()
        if jnp.shape(value) != jnp.shape(new.get_value()):
            raise ValueError(
                f"{where}: shapes differ: {jnp.shape(value)} vs {jnp.shape(new.get_value())}"
            )
        new.set_value(jnp.asarray(value, dtype=jnp.asarray(new.get_value()).dtype))
        self.old_seen.add(id(old))
        self.new_seen.add(id(new))

    def conv(self, old: Any, new: nnx.Conv, where: str) -> None:
        """``layers.QConv`` -> ``nnx.Conv``."""
        strides = (new.strides,) * 2 if isinstance(new.strides, int) else tuple(new.strides)
        padding = _canonical_padding(new.padding)
        if tuple(old.strides) != strides or _canonical_padding(old.padding) != padding:
            raise ValueError(
                f"{where}: strides/padding differ: {old.strides}, {old.padding} vs "
                f"{strides}, {padding}"
            )
        self.var(old.kernel, new.kernel, f"{where}/kernel")
        if (old.bias is None) != (new.bias is None):
            raise ValueError(f"{where}: one conv has a bias and the other has none")
        if new.bias is not None:
            self.var(old.bias, new.bias, f"{where}/bias")

    def dense(self, old: Any, new: nnx.Linear, where: str) -> None:
        """``layers.QDense`` -> ``nnx.Linear``."""
        self.var(old.kernel, new.kernel, f"{where}/kernel")
        if (old.bias is None) != (new.bias is None):
            raise ValueError(f"{where}: one dense layer has a bias and the other has none")
        if new.bias is not None:
            self.var(old.bias, new.bias, f"{where}/bias")

    def bn(self, old: Any, new: nnx.BatchNorm, where: str) -> None:
        """``layers.BatchNorm`` (wrapping ``.norm``) -> ``nnx.BatchNorm``."""
        norm = old.norm
        if (norm.momentum, norm.epsilon) != (new.momentum, new.epsilon):
            raise ValueError(
                f"{where}: momentum/epsilon differ: {norm.momentum}, {norm.epsilon} vs "
                f"{new.momentum}, {new.epsilon}"
            )
        for name in ("scale", "bias", "mean", "var"):
            self.var(getattr(norm, name), getattr(new, name), f"{where}/{name}")

    def module(self, old: Any, new: nnx.Module, where: str) -> None:
        """Dispatches on the type of the plain module ``new``."""
        if isinstance(new, zoo.ConvNet):
            if len(old.convs) != new.depth:
                raise ValueError(f"{where}: {len(old.convs)} vs {new.depth} convs")
            for i, old_block in enumerate(old.convs, start=1):
                if not old_block.relu:
                    raise ValueError(f"{where}conv{i}: the old block has no ReLU")
                self.conv(old_block.conv, getattr(new, f"conv{i}"), f"{where}conv{i}")
                self.bn(old_block.bn, getattr(new, f"bn{i}"), f"{where}bn{i}")
            if (old.fc is None) != (new.fc is None):
                raise ValueError(f"{where}: one model has a hidden dense layer, the other none")
            if new.fc is not None:
                self.dense(old.fc, new.fc, f"{where}fc")
            self.dense(old.head, new.head, f"{where}head")
        elif isinstance(new, zoo.ResNet | zoo.WideResNet):
            new_blocks = [
                (f"{where}layer{i}/{j}", block)
                for i, stage in enumerate(new.stage_layers(), start=1)
                for j, block in enumerate(stage)
            ]
            if len(old.blocks) != len(new_blocks):
                raise ValueError(f"{where}: {len(old.blocks)} vs {len(new_blocks)} blocks")
            if isinstance(new, zoo.ResNet):
                self.conv(old.stem.conv, new.stem, f"{where}stem")
                self.bn(old.stem.bn, new.stem_bn, f"{where}stem_bn")
            else:
                self.conv(old.stem, new.stem, f"{where}stem")
                self.bn(old.bn, new.bn, f"{where}bn")
            for old_block, (path, new_block) in zip(old.blocks, new_blocks, strict=True):
                self.module(old_block, new_block, f"{path}/")
            self.dense(old.head, new.head, f"{where}head")
        elif isinstance(new, models.layers.BasicBlock):
            self.conv(old.conv1.conv, new.conv1, f"{where}conv1")
            self.bn(old.conv1.bn, new.bn1, f"{where}bn1")
            self.conv(old.conv2.conv, new.conv2, f"{where}conv2")
            self.bn(old.conv2.bn, new.bn2, f"{where}bn2")
            if (old.shortcut is None) != (new.shortcut is None):
                raise ValueError(f"{where}: one block has a projection shortcut, the other none")
            if new.shortcut is not None:
                self.conv(old.shortcut.conv, new.shortcut, f"{where}shortcut")
                self.bn(old.shortcut.bn, new.shortcut_bn, f"{where}shortcut_bn")
        elif isinstance(new, models.layers.PreActBlock):
            self.bn(old.bn1, new.bn1, f"{where}bn1")
            self.conv(old.conv1, new.conv1, f"{where}conv1")
            self.bn(old.bn2, new.bn2, f"{where}bn2")
            self.conv(old.conv2, new.conv2, f"{where}conv2")
            if (old.shortcut is None) != (new.shortcut is None):
                raise ValueError(f"{where}: one block has a projection shortcut, the other none")
            if new.shortcut is not None:
                self.conv(old.shortcut, new.shortcut, f"{where}shortcut")
        elif isinstance(new, models.layers.ConvBN):
            if old.relu != new.relu:
                raise ValueError(f"{where}: relu {old.relu} vs {new.relu}")
            self.conv(old.conv, new.conv, f"{where}conv")
            self.bn(old.bn, new.bn, f"{where}bn")
        else:
            raise TypeError(f"{where or 'model'}: cannot port into {type(new).__name__}")


def _variables(module: nnx.Module) -> dict[int, str]:
    """``id -> path`` of every ``nnx.Variable`` reachable from ``module``."""
    out = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Variable):
            out[id(node)] = "/".join(map(str, path))
    return out


def port_legacy_state(old_model: nnx.Module, new_model: nnx.Module) -> None:
    """Copies every parameter and BatchNorm statistic of a legacy model into a plain one.

    ``old_model`` is a model of the bit-threading layer library (``create_model(name, ...)``
    there); ``new_model`` is ``zoo.ZOO[name](...)`` with the same architecture arguments (the
    ``.net`` of ``models.create_model``), or one of the blocks ``models.layers.BasicBlock``,
    ``models.layers.PreActBlock``, ``models.layers.ConvBN`` for the matching legacy block. Both
    structures are walked explicitly, pairing layers in forward order; the values of
    ``new_model``'s Variables are replaced in place (cast to their dtype) and ``old_model`` is
    left unchanged.

    Raises:
      ValueError: if the structures differ (layer counts, shortcuts, strides / padding,
        BatchNorm settings), a pair of Variables differs in type or shape, or some Variable of
        either model is not covered by the walk.
      TypeError: for a ``new_model`` of a type this function does not know.
    """
    porter = _Porter()
    porter.module(old_model, new_model, "")
    for name, model, seen in (
        ("old", old_model, porter.old_seen),
        ("new", new_model, porter.new_seen),
    ):
        left = sorted(path for i, path in _variables(model).items() if i not in seen)
        if left:
            raise ValueError(f"variables of the {name} model not ported: {left}")


def check_porter(legacy) -> list[str]:
    """:func:`port_legacy_state` refuses what it must refuse (tiny CNNs); returns the checks run.

    Raises:
      AssertionError: if a mismatch is not refused with the expected error.
    """
    rngs = nnx.Rngs(0)
    common = dict(num_classes=5, in_channels=1, rngs=rngs)
    old = legacy.create_model("cnn", widths=(4, 8, 8, 8), **common)
    cases = {
        "shapes differ": lambda: zoo.cnn(widths=(4, 8, 8, 16), **common),
        "hidden dense": lambda: zoo.teacher_cnn(widths=(4, 8, 8, 8), hidden=16, **common),
        "cannot port": lambda: nnx.Linear(2, 3, rngs=rngs),
    }

    def with_extra():
        new = zoo.cnn(widths=(4, 8, 8, 8), **common)
        new.extra = nnx.Param(jnp.zeros(3))
        return new

    cases["new model not ported: ['extra']"] = with_extra
    for message, make in cases.items():
        try:
            port_legacy_state(old, make())
        except (ValueError, TypeError) as e:
            assert message in str(e), (message, str(e))
        else:
            raise AssertionError(f"port_legacy_state accepted a mismatch ({message})")
    old.extra = nnx.BatchStat(jnp.zeros(3))
    try:
        port_legacy_state(old, zoo.cnn(widths=(4, 8, 8, 8), **common))
    except ValueError as e:
        assert "old model not ported: ['extra']" in str(e), str(e)
    else:
        raise AssertionError("port_legacy_state accepted a left-over legacy variable")
    return [*cases, "old model not ported: ['extra']"]


# --- Randomized, calibrated legacy weights.


def randomize(model: nnx.Module, seed: int) -> None:
    """Random values for every Variable (drawn by NumPy: no compile per shape).

    Kernels: their initial values (He / LeCun normal) x U(0.5, 1.5); BatchNorm scales
    U(0.5, 1.5); BatchNorm and dense biases 0.3 N(0, 1); running means 0.3 N(0, 1) and running
    variances U(0.5, 1.5) (overwritten by :func:`calibrate`).
    """
    rng = np.random.default_rng(seed)
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            value = np.asarray(node.get_value())
            if path[-1] == "kernel":
                value = value * rng.uniform(0.5, 1.5, value.shape)
            elif path[-1] in ("var", "scale"):
                value = rng.uniform(0.5, 1.5, value.shape)
            else:
                value = 0.3 * rng.standard_normal(value.shape)
            node.set_value(jnp.asarray(value, dtype=jnp.float32))


def calibrate(legacy_model: nnx.Module, x: jax.Array) -> None:
    """Sets every BatchNorm's running mean / variance to its batch statistics on ``x``.

    One training-mode pass of the legacy model with momentum 0 (restored afterwards), so that
    inference mode on ``x`` reproduces that pass and activations keep their scale with depth.
    """
    norms = [n for _, n in nnx.iter_graph(legacy_model) if isinstance(n, nnx.BatchNorm)]
    momenta = [n.momentum for n in norms]
    for n in norms:
        n.momentum = 0.0
    legacy_model(x, train=True)
    for n, m in zip(norms, momenta, strict=True):
        n.momentum = m


# --- Inputs.


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray] | None:
    try:
        raw = data.DATASETS["fashion_mnist"](None)
    except Exception as e:  # noqa: BLE001 (any failure to read it: fall back, say so)
        print(f"Fashion-MNIST not available ({type(e).__name__}: {e}); using random images")
        return None

    def norm(images):
        return ((images.astype(np.float32) / 255.0 - FMNIST_MEAN) / FMNIST_STD).astype(np.float32)

    return norm(raw.train.images[:CALIBRATION]), norm(raw.test.images[:BATCH])


def inputs(c: int, hw: int, seed: int, fmnist) -> tuple[np.ndarray, np.ndarray, str]:
    """``(calibration batch, test batch, description)``."""
    if c == 1 and hw == 28 and fmnist is not None:
        return *fmnist, f"Fashion-MNIST test[:{BATCH}] (calibration: train[:{CALIBRATION}])"
    rng = np.random.default_rng(seed)
    cal = rng.standard_normal((CALIBRATION, hw, hw, c)).astype(np.float32)
    x = rng.standard_normal((BATCH, hw, hw, c)).astype(np.float32)
    return cal, x, f"N(0, 1) images [{BATCH}, {hw}, {hw}, {c}]"


# --- Comparison.


def legacy_site_to_new(site: str) -> str:
    """``stage2.block1.shortcut`` -> ``layer2/0/shortcut``; ``conv3``, ``fc``, ``head`` stay."""
    m = re.fullmatch(r"stage(\d+)\.block(\d+)\.(\w+)", site)
    return f"layer{m[1]}/{int(m[2]) - 1}/{m[3]}" if m else site


def _legacy_fns(model: nnx.Module):
    graphdef, state = nnx.split(model)
    fp = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    q = jax.jit(lambda s, x, b: nnx.merge(graphdef, s)(x, b))
    return (lambda x: fp(state, x)), (lambda x, b: q(state, x, b))


def _new_fns(model: models.QuantizedModel):
    g, p, r = models.split_model(model)
    fp = jax.jit(lambda p, r, x: models.apply_model(g, p, r, x)[0])
    q = jax.jit(lambda p, r, x, b: models.apply_model(g, p, r, x, b)[0])
    return (lambda x: fp(p, r, x)), (lambda x, b: q(p, r, x, b))


def _compare(old: np.ndarray, new: np.ndarray) -> dict[str, float]:
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    scale = float(np.max(np.abs(old)))
    diff = float(np.max(np.abs(old - new)))
    agree = float(np.mean(old.argmax(-1) == new.argmax(-1)))
    return {"max_abs_diff": diff, "max_abs_logit": scale, "agreement": agree}


def _max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _merge(results: list[dict[str, float]]) -> dict[str, float]:
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in results),
        "max_abs_logit": max(r["max_abs_logit"] for r in results),
        "agreement": min(r["agreement"] for r in results),
        "cases": len(results),
    }


def _passes(r: dict[str, float]) -> bool:
    return r["max_abs_diff"] <= REL_TOL * max(1.0, r["max_abs_logit"]) and r["agreement"] == 1.0


def run_model(legacy, name: str, c: int, hw: int, kwargs: dict[str, Any], fmnist) -> dict:
    """All comparisons for one registry model."""
    t0 = time.perf_counter()
    cal, x, x_desc = inputs(c, hw, seed=zlib.crc32(name.encode()), fmnist=fmnist)
    common = dict(num_classes=NUM_CLASSES, in_channels=c, **kwargs)
    old = legacy.create_model(name, rngs=nnx.Rngs(0), weight_bits=8, **common)
    randomize(old, seed=7)
    calibrate(old, jnp.asarray(cal))
    # The same legacy model with full-precision weights (weight_bits is static per layer).
    old_w32 = legacy.create_model(name, rngs=nnx.Rngs(1), weight_bits=None, **common)
    nnx.update(old_w32, nnx.state(old))

    row: dict[str, Any] = {"model": name, "input": x_desc, "kwargs": kwargs}
    news = {}
    for wb, legacy_model in ((8, old), (None, old_w32)):
        new = models.create_model(name, image_size=hw, weight_bits=wb, rngs=nnx.Rngs(2), **common)
        port_legacy_state(legacy_model, new.net)
        news[wb] = new
    new8 = news[8]
    row["params"] = models.count_params(nnx.state(new8, nnx.Param))
    row["legacy_params"] = models.count_params(nnx.state(old, nnx.Param))

    # (c) sites.
    legacy_sites = list(old.site_names)
    new_sites = list(new8.site_names)
    row["num_sites"] = {"legacy": old.num_sites, "new": new8.num_sites}
    row["site_names"] = {"legacy": legacy_sites, "new": new_sites}
    row["sites_equal"] = (
        old.num_sites == new8.num_sites == len(new_sites)
        and [legacy_site_to_new(s) for s in legacy_sites] == new_sites
        and list(news[None].site_names) == new_sites
    )

    x = jnp.asarray(x)
    rng = np.random.default_rng(11)
    num_sites = old.num_sites
    allocations = [rng.choice(CHOICES, size=(BATCH, num_sites)) for _ in range(RANDOM_ALLOCATIONS)]
    allocations += [np.full((BATCH, num_sites), 2), np.full((BATCH, num_sites), 8)]
    allocations = [jnp.asarray(b, jnp.int32) for b in allocations]

    # (a) full precision (both weight settings: weight_bits only matters with bits).
    old_fp, old_q = _legacy_fns(old)
    new_fp, new_q = _new_fns(new8)
    row["fp"] = _merge([_compare(old_fp(x), new_fp(x))])
    # (b) quantized.
    row["w8"] = _merge([_compare(old_q(x, b), new_q(x, b)) for b in allocations])
    _, old_q32 = _legacy_fns(old_w32)
    _, new_q32 = _new_fns(news[None])
    row["wNone"] = _merge([_compare(old_q32(x, b), new_q32(x, b)) for b in allocations])
    # Controls: the cases are not trivially equal. Quantization moves the logits, the weight
    # bits matter, and a different site order (bits columns reversed) would be detected.
    b0 = allocations[0]
    q_old = np.asarray(old_q(x, b0))
    row["controls"] = {
        "w8_vs_fp": _max_abs(q_old, old_fp(x)),
        "all2_vs_fp": _max_abs(old_q(x, allocations[-2]), old_fp(x)),
        "w8_vs_wNone": _max_abs(q_old, old_q32(x, b0)),
        "reversed_sites": _max_abs(q_old, new_q(x, b0[:, ::-1])),
    }
    row["bit_identical"] = all(row[k]["max_abs_diff"] == 0.0 for k in ("fp", "w8", "wNone"))
    row["passed"] = (
        row["sites_equal"]
        and all(_passes(row[k]) for k in ("fp", "w8", "wNone"))
        and all(v > 0.0 for v in row["controls"].values())
    )
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# --- Report.


def _fmt(r: dict[str, float]) -> str:
    return f"{r['max_abs_diff']:.2e} / {100 * r['agreement']:.0f}%"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Legacy equivalence: bit-threading models (1dbe6eb) vs zoo + transform",
        "",
        f"Command: `{report['command']}`  ",
        f"Legacy code: `{report['legacy_commit']}` (quant: {report['legacy_quant']})  ",
        f"Machine: {env['cpu']}, {env['cores']} cores; jax {env['jax']} ({env['backend']}), "
        f"flax {env['flax']}, Python {env['python']}  ",
        f"Date: {report['date']}; runtime {report['seconds']} s  ",
        f"Batch {BATCH}, {NUM_CLASSES} classes, full width. Quantized: {RANDOM_ALLOCATIONS} "
        f"random allocations (per example and site from {CHOICES}) + all-2 + all-8.  ",
        f"Pass: max |old - new| <= {REL_TOL:g} * max(1, max |old|) and 100% argmax agreement "
        "in every case, and the same sites in the same order.",
        "",
        "Cells: max |old - new| over all logits of all cases / argmax agreement (worst case).",
        "",
        "| model | input | params | sites | sites equal | max abs logit | FP | "
        "quantized w8 | quantized wNone | s | pass |",
        "|---|---|---:|---:|:-:|---:|---|---|---|---:|:-:|",
    ]
    for r in report["rows"]:
        scale = max(r[k]["max_abs_logit"] for k in ("fp", "w8", "wNone"))
        lines.append(
            f"| {r['model']} | {r['input']} | {r['params']:,} | {r['num_sites']['new']} | "
            f"{'yes' if r['sites_equal'] else 'NO'} | {scale:.3g} | {_fmt(r['fp'])} | "
            f"{_fmt(r['w8'])} | {_fmt(r['wNone'])} | {r['seconds']} | "
            f"{'yes' if r['passed'] else 'NO'} |"
        )
    lines += [
        "",
        "Controls (legacy model, first random allocation unless noted; all must be > 0, i.e. "
        "the comparisons above are not trivially equal): max |quantized w8 - FP|, "
        "max |all-2 - FP|, max |w8 - wNone|, and max |old - new| when the new model gets the "
        "bits columns in reversed order.",
        "",
        "| model | w8 vs FP | all-2 vs FP | w8 vs wNone | reversed site order | bit-identical |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for r in report["rows"]:
        c = r["controls"]
        lines.append(
            f"| {r['model']} | {c['w8_vs_fp']:.3g} | {c['all2_vs_fp']:.3g} | "
            f"{c['w8_vs_wNone']:.3g} | {c['reversed_sites']:.3g} | "
            f"{'yes' if r['bit_identical'] else 'no'} |"
        )
    lines += ["", "Site names (legacy -> new), in `bits` column order:", ""]
    for r in report["rows"]:
        pairs = zip(r["site_names"]["legacy"], r["site_names"]["new"], strict=False)
        lines.append(f"* {r['model']}: " + ", ".join(f"`{a}` -> `{b}`" for a, b in pairs))
    lines += ["", f"Result: {'PASS' if report['passed'] else 'FAIL'}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [m[0] for m in MODELS]
    parser.add_argument("--models", nargs="+", default=names, choices=names)
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exit with status 1 unless every comparison passes",
    )
    parser.add_argument(
        "--current-quant",
        action="store_true",
        help="the legacy layers use the working tree's ptq_adversary.quant",
    )
    parser.add_argument("--out", type=pathlib.Path, default=OUT_DIR)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    fmnist = _fashion_mnist()
    rows = []
    with tempfile.TemporaryDirectory(prefix="legacy_ptq_") as tmp:
        legacy, commit = load_legacy(pathlib.Path(tmp), current_quant=args.current_quant)
        porter_checks = check_porter(legacy)
        for name, c, hw, kwargs in MODELS:
            if name in args.models:
                rows.append(run_model(legacy, name, c, hw, kwargs, fmnist))
                print(f"{name}: {rows[-1]['seconds']} s, passed={rows[-1]['passed']}", flush=True)
    report = {
        "command": " ".join(
            ["python", "experiments/legacy_equivalence.py", *map(shlex.quote, sys.argv[1:])]
        ),
        "legacy_commit": commit,
        "legacy_quant": "working tree" if args.current_quant else "commit",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "environment": {
            "cpu": bench_lib.cpu_model(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "jax": jax.__version__,
            "flax": flax.__version__,
            "backend": jax.default_backend(),
            "python": platform.python_version(),
        },
        "thresholds": {"rel_tol": REL_TOL, "agreement": 1.0},
        "porter_refuses": porter_checks,
        "rows": rows,
        "passed": all(r["passed"] for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = markdown(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "legacy_equivalence.md").write_text(text)
    (args.out / "legacy_equivalence.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
