"""Dynamic PTQ as a program transformation: ``quantize(fn, params, x)`` -> ``qfn(params, x, bits)``.

:func:`quantize` traces any JAX function ``fn(params, x) -> logits`` (a linen ``module.apply``
with its variables, a function over an NNX module's state, plain ``jax.numpy`` code) into its
program and finds the **quantization sites** there, so no model has to be written for this
project. The result, a :class:`QuantizedFn`, evaluates the same program with

* the data operand of every site fake-quantized per example at ``bits[:, l]`` (dynamic,
  asymmetric, :func:`~ptq_adversary.quant.fake_quant_activation`), and
* the parameter operand of every conv/dot (site or not) fake-quantized per output channel at
  the static ``weight_bits`` (:func:`~ptq_adversary.quant.fake_quant_weight`).

Site rules (docs/DESIGN.md has the full account):

* A site is a ``conv_general_dilated`` or ``dot_general`` with one operand that depends on
  ``x`` and one that depends only on ``params`` or constants. Sites are numbered in program
  order. The layer that reads the raw input (its data operand reaches ``x`` through no other
  conv/dot) is not a site unless ``quantize_first=True``: its input is the image.
* A product of two activations (attention's ``Q K^T`` and ``P V``) is not a site by default
  (``activation_products="skip"``: it runs in full precision); ``"quantize"`` makes it one site
  whose two operands are both quantized at that site's bits; ``"error"`` refuses the model.
* Sites inside ``jit``, ``remat``/``checkpoint``, ``custom_jvp`` and ``custom_vjp`` bodies are
  found: those bodies are inlined (a custom derivative rule around a site is then replaced by
  differentiation of the body, straight-through at the site). A site inside ``scan``,
  ``while_loop`` or ``cond`` is refused with an error naming the construct.

Semantics are per example whatever the model's code does: the program is traced for one example
(``x[:1]``) and the transformed function is ``jax.vmap``-ed over the batch, so ranges, and
everything else, never mix examples. :func:`quantize` checks that the traced program computes
the same thing as ``fn`` on a batch (it refuses models that mix examples, e.g. BatchNorm with
batch statistics: quantized mode runs BatchNorm on its running statistics).

Prefix sharing: cutting the program before each site's quantizer gives ``L + 1`` segments
(:meth:`QuantizedFn.run_segments`); the values live across a cut are carried, so residual
models cut as well as chains. The activations after segment ``k`` depend only on
``bits[:, :k]``, which ``ptq_adversary.audit.exhaustive`` uses to share work between
allocations with a common prefix. Bounds over sets of allocations
(:meth:`QuantizedFn.bound_segments`, :meth:`QuantizedFn.bound_margins`) run the same segments
in interval and linear-relaxation modes.

Submodules, in dependency order (each imports only those above it):

* ``errors``: :class:`TransformError`, :class:`UnsupportedPrimitiveError`.
* ``shim``: the JAX program shim, the only module that touches jaxpr types and primitive
  binding (tested on jax 0.10.2; written for the names of jax 0.6-0.11).
* ``program``: the flat program: the ``Builder`` that inlines a jaxpr into numbered ops and
  numbers the sites, and ``Program``, cut into segments with the values live at each cut.
* ``sites``: :class:`Site` and the site table (names, shapes, FLOPs shares).
* ``tracing``: tracing ``fn`` at an input shape into a flat program; locating every site's
  batch axis in a trace at a call's batch size.
* ``evaluate``: running a program's segments with fake (or integer) quantization at its sites.
* ``intervals``: interval (IBP) rules per primitive, widened for float rounding.
* ``bounds``: enclosures of segments over allocations (quantizer error bounds, split runs).
* ``linear_bounds``: CROWN-style margin bounds, minimised jointly under a bit budget.
* ``function``: :class:`QuantizedFn` (calling, the batched program, segments, bounds) and the
  per-example check.
* ``derive``: :func:`quantize`.
"""

from ptq_adversary.transform.derive import quantize
from ptq_adversary.transform.errors import TransformError, UnsupportedPrimitiveError
from ptq_adversary.transform.function import QuantizedFn
from ptq_adversary.transform.sites import Site

__all__ = [
    "QuantizedFn",
    "Site",
    "TransformError",
    "UnsupportedPrimitiveError",
    "quantize",
]
