"""transform.function: QuantizedFn's prefix cuts and its batched program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ptq_adversary import transform
from tests.transform.nets import linen, random_bits


def test_segments_chain_to_the_full_pass():
    module, variables, x = linen()
    qfn = transform.quantize(module.apply, variables, x)
    assert qfn.num_segments == 4
    bits = random_bits(7, (5, 3))
    full = np.asarray(qfn(variables, x, bits))
    h = x
    for k in range(qfn.num_segments):
        h = jax.jit(qfn.run_segments, static_argnums=(3, 4))(variables, h, bits, k, k)
    np.testing.assert_allclose(np.asarray(h), full, rtol=1e-6, atol=1e-6)
    # the cut before conv3's quantizer carries its input and the residual branch's
    live = qfn.run_segments(variables, x, bits, 0, 1)
    assert isinstance(live, tuple) and len(live) == 2
    one_alloc = qfn.run_segments(variables, x, bits[0], 0, 3)
    np.testing.assert_allclose(
        one_alloc, qfn(variables, x, jnp.broadcast_to(bits[0], (5, 3))), rtol=1e-6, atol=1e-6
    )


def test_batched_program_equals_the_vmapped_per_example_program():
    module, variables, x = linen()
    fast = transform.quantize(module.apply, variables, x)
    last = fast.num_segments - 1

    def slow(v, x, b, mode="fake"):  # every segment: the per-example program, vmapped
        return fast.run_segments(v, x, b, 0, last, mode=mode)

    bits = random_bits(11, (5, 3))
    assert fast.batched_program(5) is not None  # what fast(...) runs at batch 5
    for mode in ("fake", "integer"):
        a = jax.jit(lambda v, x, b, m=mode: fast(v, x, b, mode=m))(variables, x, bits)
        b = jax.jit(lambda v, x, b, m=mode: slow(v, x, b, mode=m))(variables, x, bits)
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda v, q=q: jnp.sum(q(v, x, bits) ** 2))(variables) for q in (fast, slow)]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
