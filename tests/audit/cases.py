"""Models, inputs and hand-built results the audit tests share."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ptq_adversary import audit, models, policy

CHOICES = (2, 3, 4, 5, 6, 8)


def images(n=12, size=12, channels=1, seed=0):
    """Random normal images ``[n, size, size, channels]`` and labels ``arange(n) % 10``."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, channels)).astype(np.float32), np.arange(n) % 10


def cnn(seed=0, image_size=12):
    """The zoo ``cnn`` (4 sites) at narrow widths, for ``image_size`` inputs."""
    return models.create_model(
        "cnn",
        num_classes=10,
        in_channels=1,
        image_size=image_size,
        rngs=nnx.Rngs(seed),
        widths=(4, 8, 8, 8),
    )


def all_bits(budget):
    """Every feasible allocation of ``budget``: int bits ``[N, L]``."""
    return np.asarray(policy.to_bits(policy.enumerate_allocations(budget), budget))


def feasible(bits, budget):
    """Whether every allocation in ``bits [..., L]`` is in the choices and meets the budget."""
    return np.all(np.isin(bits, budget.choices)) and np.all(bits.sum(-1) == budget.total)


class UserNet(nnx.Module):
    """A user's own plain-NNX model, no ptq_adversary code in it: two convs, head (2 sites)."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        y = jax.nn.relu(self.bn(self.conv1(x)))
        return self.head(jax.nn.relu(self.conv2(y)).mean((1, 2)))


def user_net(seed=0):
    """A :class:`UserNet` in inference mode."""
    net = UserNet(nnx.Rngs(seed))
    net.eval()
    return net


class LinenResNet(nn.Module):
    """A user's own linen residual network: stem, two basic blocks (one projected), head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda: nn.BatchNorm(use_running_average=not train)
        x = nn.relu(norm()(nn.Conv(4, (3, 3), use_bias=False, name="stem")(x)))
        for i, (width, stride) in enumerate([(4, 1), (8, 2)]):
            y = nn.relu(norm()(nn.Conv(width, (3, 3), stride, use_bias=False)(x)))
            y = norm()(nn.Conv(width, (3, 3), use_bias=False)(y))
            if stride != 1:
                x = nn.Conv(width, (1, 1), stride, use_bias=False, name=f"proj{i}")(x)
            x = nn.relu(x + y)
        return nn.Dense(10, name="head")(x.mean((1, 2)))


def linen_resnet(x):
    """A :class:`LinenResNet` and its variables (batch statistics from ``x``)."""
    module = LinenResNet()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    _, stats = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    return module, {**variables, **stats}


def hand_built_result(fp_correct, vulnerable, loss_increase, methods=None, fp_accuracy=None):
    """A hand-built :class:`audit.AuditResult` over two sites (no model run)."""
    fp_correct = np.asarray(fp_correct, bool)
    vulnerable = np.asarray(vulnerable, bool)
    n = len(fp_correct)
    bits = np.tile(np.array([[2, 6]], np.int32), (n, 1))
    if methods is None:
        methods = {"exhaustive": vulnerable}
    methods = {
        name: audit.MethodResult(
            accuracy=float(np.mean(fp_correct & ~np.asarray(broken, bool))),
            broken=np.asarray(broken, bool),
            worst_loss=np.ones(n, np.float32),
            bits=bits,
            evaluations=3,
            seconds=0.0,
        )
        for name, broken in methods.items()
    }
    return audit.AuditResult(
        site_names=("a", "b"),
        choices=(2, 4, 6),
        budget=4.0,
        num_allocations=3,
        fp_accuracy=float(fp_correct.mean()) if fp_accuracy is None else fp_accuracy,
        fp_correct=fp_correct,
        fp_loss=np.ones(n, np.float32),
        fp_margin=np.linspace(-1, 1, n).astype(np.float32),
        labels=np.arange(n) % 10,
        methods=methods,
        random_accuracy=None,
        vulnerable=vulnerable,
        loss_increase=np.asarray(loss_increase, np.float32),
        breaking_bits=bits,
        min_low_bit_sites=np.where(vulnerable, 1, -1),
        worst_static=None,
        skipped={},
    )


# Examples: vulnerable (0, 3), FP-correct but unbroken (1, 5), wrong already in FP (2, 4); the
# FP-wrong example 2 has the largest loss increase.
FP = [True, True, False, True, False, True]
VUL = [True, False, False, True, False, False]
LOSS = [1.0, 5.0, 9.0, 2.0, 0.1, 0.5]
