"""ptq_adversary.audit.enumeration: prefix-shared enumeration is exact (against the naive
reference and one full pass per allocation), on zoo, linen and plain-NNX models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ptq_adversary import audit, models, policy
from ptq_adversary.audit import enumeration
from tests.audit import cases
from tests.audit.cases import CHOICES


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
    x, _ = cases.images(4, 16)
    if name == "linen_resnet":
        module, variables = cases.linen_resnet(x)
        model = models.as_quantized_model(module.apply, input_shape=x.shape[1:], params=variables)
    elif name == "user_nnx":
        model = models.as_quantized_model(cases.user_net(), input_shape=x.shape[1:])
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
    model = cases.cnn()
    x, y = cases.images(10)
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    allocs = cases.all_bits(budget)
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
    model = cases.cnn()
    budget = policy.Budget(CHOICES, model.num_sites, 4.0)
    sites = enumeration.stage_sites(model)
    assert sites == [0, 1, 1, 1, 1]  # nothing before the first site's quantizer, then one each
    levels, _ = audit.prefix_tree(cases.all_bits(budget), sites)
    assert [len(lv.parent) for lv in levels] == [1, 6, 31, 109, 109]
    assert enumeration.segments(levels) == [(0, 1), (2,), (3,), (4,)] or enumeration.segments(
        levels
    )
    # A budget of "at most" allocations (every combination) has no 1:1 level.
    every = np.stack(np.meshgrid(*[CHOICES] * 4, indexing="ij"), -1).reshape(-1, 4)
    assert enumeration.segments(audit.prefix_tree(every, sites)[0]) == [
        (0,),
        (1,),
        (2,),
        (3,),
        (4,),
    ]


@pytest.mark.parametrize("kind", ["nnx", "linen"])
def test_user_models_exhaustive_equals_brute_force(kind):
    x, y = cases.images(6, 16)
    if kind == "nnx":
        model = models.as_quantized_model(cases.user_net(), input_shape=x.shape[1:])
    else:
        module, variables = cases.linen_resnet(x)
        model = models.as_quantized_model(module.apply, input_shape=x.shape[1:], params=variables)
    g, p, r = models.split_model(model)
    qfn, state = models.quantized_program(g, p, r)
    budget = policy.Budget((2, 4, 8), model.num_sites, 4.0)
    allocs = cases.all_bits(budget)
    loss, correct = audit.exhaustive(model, x, y, allocs, example_chunk=4)
    want_loss, want_correct = _brute_force(qfn, state, jnp.asarray(x), y, allocs)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, want_correct)
