"""The audit: prefix-shared enumeration is exact, searches are feasible and bounded by the
exact worst case, any linen / NNX / plain-JAX model can be audited, bad input is rejected."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import audit, config_lib, models, policy, transform
from tests.helpers import REPO, load_config, requires_fashion_mnist

CHOICES = (2, 3, 4, 5, 6, 8)


def _images(n=12, size=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, 1)).astype(np.float32), np.arange(n) % 10


def _cnn(seed=0):
    return models.create_model(
        "cnn",
        num_classes=10,
        in_channels=1,
        image_size=12,
        rngs=nnx.Rngs(seed),
        widths=(4, 8, 8, 8),
    )


def _all_bits(budget):
    return np.asarray(policy.to_bits(policy.enumerate_allocations(budget), budget))


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


def _user_net(seed=0):
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


def _linen_resnet(x):
    module = LinenResNet()
    variables = module.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    _, stats = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    return module, {**variables, **stats}


def _brute_force(qfn, state, x, y, allocs):
    """One full quantized pass per allocation: loss and correct ``[N, B]``."""
    run = jax.jit(lambda b: qfn(state, x, jnp.broadcast_to(b, (len(x), len(b)))))
    logits = np.stack([np.asarray(run(jnp.asarray(a))) for a in allocs])
    log_p = np.asarray(jax.nn.log_softmax(logits))
    label = np.broadcast_to(y[None, :, None], (len(allocs), len(y), 1))
    return -np.take_along_axis(log_p, label, 2)[..., 0], logits.argmax(-1) == y[None]


def test_prefix_tree_groups_shared_prefixes():
    allocs = np.array([[2, 2, 8], [2, 4, 6], [2, 4, 4], [4, 2, 6]])
    levels, order = audit.prefix_tree(allocs, [0, 1, 2])
    assert [len(lv.parent) for lv in levels] == [1, 2, 4]
    assert levels[0].bits.shape == (1, 0)
    # Rebuild every allocation by walking up the tree from its leaf.
    for n, leaf in enumerate(order):
        l2 = levels[2]
        p1 = l2.parent[leaf]
        rebuilt = [*levels[1].bits[p1], *l2.bits[leaf]]
        assert rebuilt == allocs[n].tolist()
    with pytest.raises(ValueError, match="stages cover 2 sites"):
        audit.prefix_tree(allocs, [1, 1])


def _zoo(name, kwargs):
    model = models.create_model(
        name, num_classes=10, in_channels=1, image_size=16, rngs=nnx.Rngs(1), **kwargs
    )
    model.net.eval()
    return model


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cnn", {"widths": (4, 8, 8, 8)}),
        ("teacher_cnn", {"widths": (4, 8, 8, 8), "hidden": 8}),  # fc stage
        ("resnet20", {"width": 0.25}),  # (wrn16_4's pre-activation blocks: legacy_equivalence)
        ("linen_resnet", None),
        ("user_nnx", None),
    ],
)
def test_program_segments_compose_to_the_full_pass(name, kwargs):
    x, _ = _images(4, 16)
    if name == "linen_resnet":
        module, variables = _linen_resnet(x)
        model = models.as_quantized_model(module.apply, input_shape=x.shape[1:], params=variables)
    elif name == "user_nnx":
        model = models.as_quantized_model(_user_net(), input_shape=x.shape[1:])
    else:
        model = _zoo(name, kwargs)
    g, p, r = models.split_model(model)
    qfn, state = models.quantized_program(g, p, r)
    assert qfn.num_segments == model.num_sites + 1
    bits = np.random.default_rng(0).choice(CHOICES, size=(4, model.num_sites)).astype(np.int32)

    @jax.jit
    def composed(state, x, bits):
        h = x
        for k in range(qfn.num_segments):
            h = qfn.run_segments(state, h, bits, k, k)
        return h

    direct = jax.jit(lambda p, x, bits: models.apply_model(g, p, r, x, bits, branches=1)[0])
    np.testing.assert_allclose(composed(state, x, bits), direct(p, x, bits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("row_chunk", [1, 8])
def test_exhaustive_prefix_sharing_equals_naive_exactly(row_chunk):
    model = _cnn()
    x, y = _images(10)
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    allocs = _all_bits(budget)
    kw = dict(example_chunk=4, row_chunk=row_chunk)  # padded last chunk; rows one by one or vmapped
    shared = audit.exhaustive(model, x, y, allocs, **kw)
    naive = audit.exhaustive(model, x, y, allocs, prefix_sharing=False, **kw)
    np.testing.assert_array_equal(shared[0], naive[0])
    np.testing.assert_array_equal(shared[1], naive[1])
    # ...and both equal one plain model call per allocation (to float32 reduction order).
    g, p, r = models.split_model(model)
    for n in (0, 37, len(allocs) - 1):
        bits = np.broadcast_to(allocs[n], (len(x), model.num_sites))
        logits = models.apply_model(g, p, r, jnp.asarray(x), bits)[0]
        log_p = np.asarray(jax.nn.log_softmax(logits))
        loss = -np.take_along_axis(log_p, y[:, None], 1)[:, 0]
        np.testing.assert_allclose(shared[0][n], loss, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(shared[1][n], np.argmax(logits, -1) == y)


def test_segments_join_one_to_one_levels():
    # Exact budget: the head's bits follow from the conv sites, so its level is 1:1 with the
    # last conv's and both run in one call; the no-sharing tree is 1:1 below the root.
    model = _cnn()
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    sites = audit._stage_sites(model)
    assert sites == [0, 1, 1, 1, 1]  # nothing before the first site's quantizer, then one each
    levels, _ = audit.prefix_tree(_all_bits(budget), sites)
    assert [len(lv.parent) for lv in levels] == [1, 6, 31, 109, 109]
    assert audit._segments(levels) == [(0, 1), (2,), (3,), (4,)] or audit._segments(levels)
    # A budget of "at most" allocations (every combination) has no 1:1 level.
    every = np.stack(np.meshgrid(*[CHOICES] * 4, indexing="ij"), -1).reshape(-1, 4)
    assert audit._segments(audit.prefix_tree(every, sites)[0]) == [(0,), (1,), (2,), (3,), (4,)]


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_user_models_exhaustive_equals_brute_force(kind):
    x, y = _images(6, 16)
    if kind == "nnx":
        model = models.as_quantized_model(_user_net(), input_shape=x.shape[1:])
    else:
        module, variables = _linen_resnet(x)
        model = models.as_quantized_model(module.apply, input_shape=x.shape[1:], params=variables)
    g, p, r = models.split_model(model)
    qfn, state = models.quantized_program(g, p, r)
    budget = policy.Budget((2, 4, 8), model.num_sites, 4.0)
    allocs = _all_bits(budget)
    loss, correct = audit.exhaustive(model, x, y, allocs, example_chunk=4)
    want_loss, want_correct = _brute_force(qfn, state, jnp.asarray(x), y, allocs)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, want_correct)


def _feasible(bits, budget):
    return np.all(np.isin(bits, budget.choices)) and np.all(bits.sum(-1) == budget.total)


def test_neighbours_are_feasible_and_move_two_sites():
    budget = policy.Budget(CHOICES, 4, 4.0)
    start = np.broadcast_to(policy.uniform_allocation(budget), (2, 3, 4))
    cand = np.asarray(audit._neighbours(jax.random.key(0), jnp.asarray(start), budget, 5))
    assert cand.shape == (10, 3, 4)
    values = np.asarray(budget.choices)[cand]
    assert _feasible(values, budget)
    changed = (cand != start[0][None]).sum(-1)
    assert np.all(changed == 2)  # the uniform allocation has > 5 feasible moves


@pytest.fixture(scope="module")
def tiny_audit():
    model = _cnn(seed=3)
    x, y = _images(16, seed=1)
    result = audit.audit(
        model, x, y, choices=CHOICES, budget=4.0, num_iters=2, beam_width=2, num_moves=3,
        policy_config=audit.PolicyConfig(steps=2, batch_size=8, num_samples=2, widths=(4,)),
        example_chunk=8, progress=False,
    )  # fmt: skip
    return model, x, y, result


def test_audit_searches_are_bounded_by_the_exact_worst_case(tiny_audit):
    model, x, y, r = tiny_audit
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    exact = r.methods["exhaustive"]
    assert exact.evaluations == r.num_allocations == policy.num_allocations(budget)
    for name in ("random_search", "greedy", "beam", "uniform", "policy"):
        m = r.methods[name]
        assert np.all(m.worst_loss <= exact.worst_loss + 1e-5), name
        assert not np.any(m.broken & ~exact.broken), name  # nothing the oracle misses
        assert m.accuracy >= exact.accuracy, name
        assert _feasible(m.bits, budget), name
    # uniform + 4 low-bit starts + iterations x width x moves
    assert r.methods["greedy"].evaluations == r.methods["beam"].evaluations == 1 + 4 + 2 * 2 * 3
    assert r.methods["random_search"].evaluations == 17  # equal cost by default
    # The reported breaking allocation really breaks each vulnerable example.
    loss, correct = audit.evaluate_allocations(model, x, y, r.breaking_bits)
    np.testing.assert_array_equal(~correct & r.fp_correct, r.vulnerable)
    # Fewest low-bit sites: consistent with the breaking allocations of the oracle.
    vul = r.vulnerable
    assert np.all((r.min_low_bit_sites >= 0) == vul)
    assert np.all(r.min_low_bit_sites[vul] <= (r.breaking_bits[vul] < 4).sum(-1))


def test_audit_ranking_puts_vulnerable_first(tiny_audit):
    *_, r = tiny_audit
    rank = r.ranking()
    k = int(r.vulnerable.sum())
    assert np.all(r.vulnerable[rank[:k]]) and not np.any(r.vulnerable[rank[k:]])
    assert np.all(np.diff(r.loss_increase[rank[:k]]) <= 0)


def test_audit_report_files(tiny_audit, tmp_path):
    *_, r = tiny_audit
    paths = audit.write_report(r, str(tmp_path), title="tiny")
    for p in paths.values():
        assert os.path.getsize(p) > 0, p
    summary = json.loads((tmp_path / "audit.json").read_text())
    assert set(summary["methods"]) == set(r.methods)
    rows = (tmp_path / "examples.csv").read_text().splitlines()
    assert len(rows) == 1 + r.num_examples and rows[0].endswith("bits_head")
    assert "exhaustive (oracle)" in (tmp_path / "summary.md").read_text()


def test_audit_plain_nnx_model():
    x, y = _images(8)
    methods = ("uniform", "greedy", "exhaustive")
    r = audit.audit(_user_net(2), x, y, choices=(2, 4, 6, 8), budget=5.0, methods=methods,
                    num_iters=1, num_moves=40, progress=False)  # fmt: skip
    assert r.site_names == ("conv2", "head")
    assert r.num_allocations == 4  # (2, 8), (4, 6), (6, 4), (8, 2)
    assert set(r.methods) == {"uniform", "greedy", "exhaustive"}
    assert np.all(r.methods["greedy"].worst_loss <= r.methods["exhaustive"].worst_loss + 1e-5)


def test_audit_linen_model_end_to_end():
    x, y = _images(8, 16)
    module, variables = _linen_resnet(x)
    r = audit.audit(module.apply, x, y, params=variables, choices=(2, 4, 8), budget=4.0,
                    methods=("uniform", "random", "exhaustive"), num_random=3,
                    progress=False)  # fmt: skip
    assert r.site_names[0] == "Conv_0" and r.site_names[-1] == "head"
    assert "proj1" in r.site_names
    assert np.all(
        r.methods["random_search"].worst_loss <= r.methods["exhaustive"].worst_loss + 1e-5
    )


def test_audit_rejects_models_the_transform_cannot_serve():
    x, y = _images(4, 16)
    module, variables = _linen_resnet(x)
    kw = dict(choices=(2, 4, 8), budget=4.0, methods=("uniform",), progress=False)
    with pytest.raises(TypeError, match="params="):
        audit.audit(module.apply, x, y, **kw)  # a linen module without its variables
    train_mode = lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])[0]
    with pytest.raises(transform.TransformError, match="mixes examples"):
        audit.audit(train_mode, x, y, params=variables, **kw)
    w = jnp.ones((16 * 16, 10)) * 0.01
    one_layer = lambda p, x: x.reshape(x.shape[0], -1) @ p
    with pytest.raises(transform.TransformError, match="no quantization site"):
        audit.audit(one_layer, x, y, params=w, **kw)

    def ignores_bits(p, x):  # a site whose output is multiplied away: bits have no effect
        h = x.reshape(x.shape[0], -1) @ p
        return (h @ jnp.ones((10, 10))) * 0.0 + h

    with pytest.raises(transform.TransformError, match="does not depend on the bits"):
        audit.audit(ignores_bits, x, y, params=w, **kw)

    def scanned(p, x):
        h = x.reshape(x.shape[0], -1) @ p
        h, _ = jax.lax.scan(lambda h, _: (h @ jnp.eye(10), None), h, None, length=2)
        return h

    with pytest.raises(transform.TransformError, match="lax.scan"):
        audit.audit(scanned, x, y, params=w, **kw)


def test_exhaustive_is_skipped_above_the_limit():
    model = _cnn()
    x, y = _images(4)
    r = audit.audit(model, x, y, choices=CHOICES, budget=4.0, methods=("uniform", "exhaustive"),
                    max_allocations=10, progress=False)  # fmt: skip
    assert "exhaustive" not in r.methods and "109" in r.skipped["exhaustive"]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x, y: (x * np.nan, y), "NaN or inf"),
        (lambda x, y: (x[..., 0], y), r"images must be \[B, H, W, C\]"),
        (lambda x, y: (x, y[:-1]), r"labels must be \[B\]"),
        (lambda x, y: ((x * 255).astype(np.uint8), y), "images must be float"),
        (lambda x, y: (x, y + 10), r"labels must be in \[0, 10\)"),
    ],
    ids=["nan", "rank", "labels-shape", "uint8", "label-range"],
)
def test_audit_rejects_bad_data(change, match):
    x, y = change(*_images(4))
    with pytest.raises(ValueError, match=match):
        audit.audit(_cnn(), x, y, choices=CHOICES, budget=4.0, methods=("uniform",))


def test_audit_rejects_bad_settings():
    x, y = _images(4)
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        audit.audit(_cnn(), x, y, choices=CHOICES, budget=4.0, methods=("oracle",))
    with pytest.raises(policy.InfeasibleBudgetError):
        audit.audit(_cnn(), x, y, choices=CHOICES, budget=1.0, methods=("uniform",))


def test_audit_config_validates_and_rejects_bad_fields():
    config = load_config(REPO / "configs" / "audit.py", "smoke")
    config_lib.validate(config)
    for field, value, match in [
        ("audit.methods", ("uniform", "oracle"), "audit.methods"),
        ("source.kind", "pair", "source.kind"),
        ("audit.num_moves", 0, "audit.num_moves"),
        ("audit.choices", (4, 2), "audit.choices"),
    ]:
        bad = load_config(REPO / "configs" / "audit.py", "smoke")
        with bad.unlocked():
            section, key = field.rsplit(".", 1)
            bad[section][key] = value
        with pytest.raises(config_lib.ConfigError, match=match):
            config_lib.validate(bad)


@requires_fashion_mnist
@pytest.mark.integration
def test_audit_command_smoke(tmp_path):
    from ptq_adversary.trainers import audit as audit_trainer

    config = load_config(REPO / "configs" / "audit.py", "smoke")
    summary = audit_trainer.run_audit(config, str(tmp_path))
    assert summary["num_examples"] == 64 and summary["num_allocations"] == 109
    for name in ("audit.json", "examples.csv", "summary.md", "results.json",
                 "accuracy_by_method.png"):  # fmt: skip
        assert (tmp_path / name).exists(), name
    # A missing pipeline source is a config error naming the field, before any work.
    with config.unlocked():
        config.source.kind = "student"
        config.source.pipeline_dir = str(tmp_path / "nowhere")
    with pytest.raises(config_lib.ConfigError, match="source.pipeline_dir"):
        audit_trainer.run_audit(config, str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()


def test_beam_search_with_random_restarts():
    model = _cnn(seed=4)
    x, y = _images(8, seed=2)
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    r = audit.beam_search(model, x, y, budget, width=2, num_moves=2, num_iters=1, num_init=5,
                          example_chunk=8)  # fmt: skip
    assert r.evaluations == 1 + 5 + 2 * 2
    assert _feasible(r.worst_bits, budget) and _feasible(r.broken_bits, budget)
    exact_loss, _ = audit.exhaustive(model, x, y, _all_bits(budget))
    assert np.all(r.worst_loss <= exact_loss.max(axis=0) + 1e-5)


def test_low_bit_starts_put_one_site_at_the_lowest_choice():
    budget = policy.Budget(CHOICES, 4, 4.0)
    starts = audit.low_bit_starts(budget)
    bits = np.asarray(policy.to_bits(starts, budget))
    assert starts.shape == (4, 4) and len(np.unique(starts, axis=0)) == 4
    assert np.all(bits.sum(-1) == budget.total)
    assert sorted(np.argmin(bits, -1).tolist()) == [0, 1, 2, 3]
    assert np.all(np.sort(bits, -1)[:, :2] == [[2, 4]] * 4)  # 2 + the rest spread: 2,4,5,5
    # No room for the lowest choice (budget = the lowest choice everywhere), and L = 1.
    assert audit.low_bit_starts(policy.Budget(CHOICES, 3, 2.0)).shape[0] == 1
    assert audit.low_bit_starts(policy.Budget(CHOICES, 1, 4.0)).shape == (0, 1)


def test_beam_search_with_low_bit_starts_evaluates_them():
    model = _cnn(seed=4)
    x, y = _images(8, seed=2)
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    kwargs = dict(width=1, num_moves=2, num_iters=1, example_chunk=8)
    r = audit.beam_search(model, x, y, budget, low_starts=True, **kwargs)
    assert r.evaluations == 1 + 4 + 2
    # Every low-bit start was evaluated: the found worst is at least each start's loss.
    start_bits = np.asarray(policy.to_bits(audit.low_bit_starts(budget), budget))
    loss, _ = audit.exhaustive(model, x, y, start_bits)
    assert np.all(r.worst_loss >= loss.max(axis=0) - 1e-6)
    assert _feasible(r.worst_bits, budget)


def test_audit_command_on_a_user_factory_model(tmp_path):
    """The audit CLI on a user's own architecture, built from an import path."""
    from ptq_adversary.trainers import audit as audit_trainer

    config = load_config(REPO / "configs" / "audit.py", "smoke")
    with config.unlocked():
        config.model.name = "small_net"
        config.model.factory = "tests.user_model:build"
        config.model.kwargs = type(config.model.kwargs)({"width": 4})
        config.audit.methods = ("uniform", "random", "exhaustive")
    summary = audit_trainer.run_audit(config, str(tmp_path))
    assert summary["site_names"] == ["conv2", "head"]
    assert summary["num_allocations"] == 5  # (2, 6), (3, 5), (4, 4), (5, 3), (6, 2)
    with config.unlocked():
        config.model.factory = "tests.user_model:no_such_function"
    with pytest.raises(config_lib.ConfigError, match="model.factory.*no function"):
        audit_trainer.run_audit(config, str(tmp_path / "other"))
