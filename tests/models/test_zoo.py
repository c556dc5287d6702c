"""``ptq_adversary.models.zoo``: the built-in networks and the sites create_model derives.

The expected parameter counts, program orders and site names below were measured on the
legacy bit-threading models they replace (``ptq_adversary/{layers,models}.py`` at commit
1dbe6eb): legacy site ``stage{i}.block{j}.X`` is ``layer{i}/{j-1}/X`` here, and ``conv2``,
``fc``, ``head`` keep their names. ``experiments/legacy_equivalence.py`` checks, on the same
weights, that the old and the new models compute the same logits (FP and quantized).
"""

import re

import jax
import jax.extend.core as jex
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import models
from ptq_adversary.models import zoo
from tests.models.cases import rngs

_TOL = dict(rtol=1e-5, atol=1e-6)

# Tiny versions of every registry model: (architecture kwargs, in_channels, spatial size).
_TINY = {
    "cnn": (dict(widths=(4, 8, 8, 8)), 1, 28),
    "teacher_cnn": (dict(widths=(4, 8, 8, 8), hidden=16), 1, 12),
    "resnet18": (dict(width=0.125), 3, 12),
    "resnet20": (dict(width=0.25), 3, 12),
    "wrn16_4": (dict(width=0.125), 3, 8),
}
_NUM_CLASSES = 5
_BATCH = 3

# Parameter counts of the legacy models (1dbe6eb): _TINY with 5 classes, and the full-size
# registry models with 10 classes (28x28x1 for the CNNs, 3 channels for the ResNets).
_TINY_PARAMS = {
    "cnn": 1_577,
    "teacher_cnn": 1_761,
    "resnet18": 176_077,
    "resnet20": 17_449,
    "wrn16_4": 43_519,
}
_FULL_PARAMS = {
    "cnn": 61_050,
    "teacher_cnn": 266_810,
    "resnet18": 11_173_962,
    "resnet20": 272_474,
    "wrn16_4": 2_748_890,
}

# Site names of the legacy models (1dbe6eb), in their `bits` column order.
_LEGACY_SITES = {
    "cnn": ("conv2", "conv3", "conv4", "head"),
    "teacher_cnn": ("conv2", "conv3", "conv4", "fc", "head"),
    "resnet18": (
        "stage1.block1.conv1", "stage1.block1.conv2",
        "stage1.block2.conv1", "stage1.block2.conv2",
        "stage2.block1.conv1", "stage2.block1.conv2", "stage2.block1.shortcut",
        "stage2.block2.conv1", "stage2.block2.conv2",
        "stage3.block1.conv1", "stage3.block1.conv2", "stage3.block1.shortcut",
        "stage3.block2.conv1", "stage3.block2.conv2",
        "stage4.block1.conv1", "stage4.block1.conv2", "stage4.block1.shortcut",
        "stage4.block2.conv1", "stage4.block2.conv2",
        "head",
    ),
    "resnet20": (
        "stage1.block1.conv1", "stage1.block1.conv2",
        "stage1.block2.conv1", "stage1.block2.conv2",
        "stage1.block3.conv1", "stage1.block3.conv2",
        "stage2.block1.conv1", "stage2.block1.conv2", "stage2.block1.shortcut",
        "stage2.block2.conv1", "stage2.block2.conv2",
        "stage2.block3.conv1", "stage2.block3.conv2",
        "stage3.block1.conv1", "stage3.block1.conv2", "stage3.block1.shortcut",
        "stage3.block2.conv1", "stage3.block2.conv2",
        "stage3.block3.conv1", "stage3.block3.conv2",
        "head",
    ),
    "wrn16_4": (
        "stage1.block1.conv1", "stage1.block1.conv2", "stage1.block1.shortcut",
        "stage1.block2.conv1", "stage1.block2.conv2",
        "stage2.block1.conv1", "stage2.block1.conv2", "stage2.block1.shortcut",
        "stage2.block2.conv1", "stage2.block2.conv2",
        "stage3.block1.conv1", "stage3.block1.conv2", "stage3.block1.shortcut",
        "stage3.block2.conv1", "stage3.block2.conv2",
        "head",
    ),
}  # fmt: skip

# The same sites as the new code names them (models.create_model(...).site_names).
_SITES = {
    "cnn": ("conv2", "conv3", "conv4", "head"),
    "teacher_cnn": ("conv2", "conv3", "conv4", "fc", "head"),
    "resnet18": (
        "layer1/0/conv1", "layer1/0/conv2",
        "layer1/1/conv1", "layer1/1/conv2",
        "layer2/0/conv1", "layer2/0/conv2", "layer2/0/shortcut",
        "layer2/1/conv1", "layer2/1/conv2",
        "layer3/0/conv1", "layer3/0/conv2", "layer3/0/shortcut",
        "layer3/1/conv1", "layer3/1/conv2",
        "layer4/0/conv1", "layer4/0/conv2", "layer4/0/shortcut",
        "layer4/1/conv1", "layer4/1/conv2",
        "head",
    ),
    "resnet20": (
        "layer1/0/conv1", "layer1/0/conv2",
        "layer1/1/conv1", "layer1/1/conv2",
        "layer1/2/conv1", "layer1/2/conv2",
        "layer2/0/conv1", "layer2/0/conv2", "layer2/0/shortcut",
        "layer2/1/conv1", "layer2/1/conv2",
        "layer2/2/conv1", "layer2/2/conv2",
        "layer3/0/conv1", "layer3/0/conv2", "layer3/0/shortcut",
        "layer3/1/conv1", "layer3/1/conv2",
        "layer3/2/conv1", "layer3/2/conv2",
        "head",
    ),
    "wrn16_4": (
        "layer1/0/conv1", "layer1/0/conv2", "layer1/0/shortcut",
        "layer1/1/conv1", "layer1/1/conv2",
        "layer2/0/conv1", "layer2/0/conv2", "layer2/0/shortcut",
        "layer2/1/conv1", "layer2/1/conv2",
        "layer3/0/conv1", "layer3/0/conv2", "layer3/0/shortcut",
        "layer3/1/conv1", "layer3/1/conv2",
        "head",
    ),
}  # fmt: skip

# The convs with stride 2 (every other conv has stride 1), as in the legacy programs.
_STRIDE2 = {
    "cnn": {"conv2", "conv3"},
    "teacher_cnn": {"conv2", "conv3"},
    "resnet18": {f"layer{i}/0/{c}" for i in (2, 3, 4) for c in ("conv1", "shortcut")},
    "resnet20": {f"layer{i}/0/{c}" for i in (2, 3) for c in ("conv1", "shortcut")},
    "wrn16_4": {f"layer{i}/0/{c}" for i in (2, 3) for c in ("conv1", "shortcut")},
}


def _build(name, seed=1):
    kwargs, c, hw = _TINY[name]
    net = zoo.ZOO[name](num_classes=_NUM_CLASSES, in_channels=c, rngs=rngs(seed), **kwargs)
    x = jax.random.normal(jax.random.key(seed + 100), (_BATCH, hw, hw, c))
    return net, x


def _max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _legacy_site_to_path(site):
    """``stage2.block1.shortcut`` -> ``layer2/0/shortcut``; ``conv3`` and ``head`` stay."""
    m = re.fullmatch(r"stage(\d+)\.block(\d+)\.(\w+)", site)
    return f"layer{m[1]}/{int(m[2]) - 1}/{m[3]}" if m else site


# --- Parameter counts and sites.


@pytest.mark.parametrize("name", sorted(_TINY))
def test_param_counts_match_legacy(name):
    kwargs, c, _ = _TINY[name]
    abstract = nnx.eval_shape(
        lambda: zoo.ZOO[name](num_classes=_NUM_CLASSES, in_channels=c, rngs=nnx.Rngs(0), **kwargs)
    )
    assert models.count_params(nnx.state(abstract, nnx.Param)) == _TINY_PARAMS[name]


def test_full_size_param_counts_match_legacy():
    def count(name):
        c = 1 if "cnn" in name else 3
        fn = zoo.ZOO[name]
        abstract = nnx.eval_shape(lambda: fn(num_classes=10, in_channels=c, rngs=nnx.Rngs(0)))
        return models.count_params(nnx.state(abstract, nnx.Param))

    assert {name: count(name) for name in zoo.ZOO} == _FULL_PARAMS


def test_registry():
    assert list(zoo.ZOO) == ["cnn", "teacher_cnn", "resnet18", "resnet20", "wrn16_4"]
    assert models.MODELS == zoo.ZOO


def test_expected_site_names_are_the_legacy_sites_renamed():
    assert set(_SITES) == set(_LEGACY_SITES) == set(zoo.ZOO)
    for name, legacy in _LEGACY_SITES.items():
        assert tuple(map(_legacy_site_to_path, legacy)) == _SITES[name], name


@pytest.mark.parametrize("name", sorted(_TINY))
def test_create_model_site_names(name):
    # Site names do not depend on widths or image size: the tiny models have the registry's.
    kwargs, c, hw = _TINY[name]
    model = models.create_model(
        name, num_classes=_NUM_CLASSES, in_channels=c, image_size=hw, rngs=rngs(0), **kwargs
    )
    print(f"{name}: {model.site_names}")
    assert model.site_names == _SITES[name]
    assert model.num_sites == len(_SITES[name]) == len(_LEGACY_SITES[name])
    assert model.weight_bits == 8


# --- Program order of the convs / dense layers.

_LINEAR_PRIMITIVES = ("conv_general_dilated", "dot_general")


def _linear_eqns(jaxpr, names):
    """``(primitive, eqn, name of its rhs)`` for every conv / dot_general in program order,
    recursing into sub-jaxprs (``jit``, ``custom_jvp_call``, ...). ``names`` maps Vars to the
    parameter path they hold; it is carried into a sub-jaxpr when its inputs line up with the
    equation's."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _LINEAR_PRIMITIVES:
            out.append((eqn.primitive.name, eqn, names.get(eqn.invars[1])))
        for value in eqn.params.values():
            subs = value if isinstance(value, tuple | list) else (value,)
            for sub in subs:
                if isinstance(sub, jex.ClosedJaxpr):
                    sub = sub.jaxpr
                if not isinstance(sub, jex.Jaxpr):
                    continue
                sub_names = {}
                if len(sub.invars) == len(eqn.invars):
                    sub_names = {
                        s: names[o]
                        for s, o in zip(sub.invars, eqn.invars, strict=True)
                        if isinstance(o, jex.Var) and o in names
                    }
                out.extend(_linear_eqns(sub, sub_names))
    return out


def _program(model, x):
    """Linear eqns of the functional forward pass ``merge(graphdef, state)(x)``, named by the
    parameter paths of the state."""
    graphdef, state = nnx.split(model)
    closed = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    paths = [
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1])
        for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]
    ]
    names = dict(zip(closed.jaxpr.invars, [*paths, "x"], strict=True))
    return _linear_eqns(closed.jaxpr, names)


@pytest.mark.parametrize("name", sorted(_TINY))
def test_program_order_is_the_legacy_site_order(name):
    net, x = _build(name)
    net.eval()
    program = _program(net, x)
    # Every conv/dense is one eqn: the first conv (not a site), then the sites in order.
    first = "conv1" if "cnn" in name else "stem"
    got = [path for _, _, path in program]
    assert got == [f"{first}/kernel"] + [f"{site}/kernel" for site in _SITES[name]]
    # The legacy strides and padding (k // 2 on every side), op by op.
    for primitive, eqn, path in program:
        if primitive != "conv_general_dilated":
            continue
        k = eqn.invars[1].aval.shape[0]
        want_strides = (2, 2) if path.removesuffix("/kernel") in _STRIDE2[name] else (1, 1)
        assert tuple(eqn.params["window_strides"]) == want_strides, path
        assert tuple(map(tuple, eqn.params["padding"])) == ((k // 2, k // 2),) * 2, path
    assert program[-1][0] == "dot_general"


def test_conv_padding_is_explicit_not_same():
    net, x = _build("cnn")
    assert net.conv2.strides == (2, 2)
    assert net.conv2.padding == ((1, 1), (1, 1))
    program = _program(net, x)
    paddings = [e.params["padding"] for p, e, _ in program if p == "conv_general_dilated"]
    assert len(paddings) == 4
    assert all(tuple(map(tuple, pad)) == ((1, 1), (1, 1)) for pad in paddings)
    # Symmetric padding at stride 2: 28 -> 14 -> 7, the first and last rows both padded.
    assert [tuple(e.outvars[0].aval.shape[1:3]) for p, e, _ in program if p != "dot_general"] == [
        (28, 28),
        (14, 14),
        (7, 7),
        (7, 7),
    ]


def test_kernel_paths_read_as_layer_names():
    def kernels(model):
        flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
        return [
            "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1])
            for path, _ in flat
            if getattr(path[-2], "key", None) == "kernel"
        ]

    new_cnn, _ = _build("cnn")
    assert kernels(new_cnn) == [f"conv{i}/kernel" for i in range(1, 5)] + ["head/kernel"]
    new_resnet, _ = _build("resnet20")
    paths = kernels(new_resnet)
    assert "layer2/0/shortcut/kernel" in paths and "layer1/0/shortcut/kernel" not in paths
    assert {"stem/kernel", "layer3/2/conv2/kernel", "head/kernel"} <= set(paths)
    assert len(paths) == 22


# --- BatchNorm mode switching.


def _batch_norms(model):
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.BatchNorm)]


def test_eval_uses_running_statistics_and_train_updates_them():
    new, x = _build("resnet20")
    bns = _batch_norms(new)
    assert bns and all(bn.use_running_average is False for bn in bns)  # fresh: training mode
    assert all((bn.momentum, bn.epsilon) == (0.9, 1e-5) for bn in bns)

    new.eval()
    assert all(bn.use_running_average is True for bn in bns)
    before = jax.tree.map(np.asarray, nnx.state(new, nnx.BatchStat))
    out = new(x)
    # Running statistics are unchanged, and each example is normalized independently of the
    # rest of the batch.
    after = nnx.state(new, nnx.BatchStat)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))
    np.testing.assert_allclose(new(x[:1]), out[:1], **_TOL)
    # Eval mode reads the running statistics: moving one BatchNorm's mean moves the output.
    bns[0].mean.set_value(bns[0].mean.get_value() + 1.0)
    assert _max_abs(new(x), out) > 1e-3

    new.train()
    assert all(bn.use_running_average is False for bn in bns)
    before = jax.tree.map(np.asarray, nnx.state(new, nnx.BatchStat))
    train_out = new(x)
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, np.asarray(b)), before, nnx.state(new, nnx.BatchStat)
    )
    assert all(jax.tree.leaves(changed))
    assert _max_abs(train_out, out) > 1e-3  # the two modes really differ
