"""The quantized function: :class:`QuantizedFn`, what :func:`~ptq_adversary.transform.quantize`
returns.

It holds the per-example :class:`~ptq_adversary.transform.program.Program` and calls it
``jax.vmap``-ed over the batch, or, where a trace at the call's batch size is the same program
with every site's batch axis located, that batched program
(:meth:`QuantizedFn.batched_program`). Prefix cuts (:meth:`QuantizedFn.run_segments`) and
bounds (:meth:`QuantizedFn.bound_segments`, :meth:`QuantizedFn.bound_margins`) run segments of
the per-example program. :func:`check_per_example` is the check that the per-example program
computes what ``fn`` computes on a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ptq_adversary.transform.bounds import bound_segments
from ptq_adversary.transform.errors import TransformError
from ptq_adversary.transform.evaluate import evaluate_segments
from ptq_adversary.transform.linear_bounds import margin_bounds
from ptq_adversary.transform.program import Program, make_program
from ptq_adversary.transform.sites import Site
from ptq_adversary.transform.tracing import batch_axes, flatten

__all__ = ["QuantizedFn", "check_per_example"]


class QuantizedFn:
    """``fn`` under dynamic PTQ: ``qfn(params, x, bits=None) -> fn's output``.

    Built by :func:`~ptq_adversary.transform.quantize`; see the package docstring for the
    site rules.

    Attributes:
      num_sites: ``L``, the number of activation sites.
      site_names: their names, in ``bits`` column order (program order).
      sites: one :class:`Site` per site.
      weight_bits: the static weight bit-width (``None``: full-precision weights).
      fn: the original function (the full-precision path).
    """

    def __init__(
        self,
        fn: Callable,
        program: Program,
        sites: tuple[Site, ...],
        treedef,
        in_avals,
        x_aval,
        out_tree,
        options,
    ):
        self.fn = fn
        self._program = program
        self.sites = sites
        self.num_sites = len(sites)
        self.site_names = tuple(s.name for s in sites)
        self.weight_bits = program.weight_bits
        self._treedef = treedef
        self._param_avals = in_avals
        self._x_aval = x_aval
        self._out_tree = out_tree
        self._options = options
        self._batched: dict[int, Program | None] = {}

    def __repr__(self) -> str:
        return f"QuantizedFn({self.num_sites} sites: {', '.join(self.site_names)})"

    def describe(self) -> str:
        """A markdown table of the sites: name, op, shapes, share of the FLOPs."""
        rows = [
            "| # | site | op | input | weight | output | FLOPs share |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in self.sites:
            rows.append(
                f"| {s.index} | {s.name} | {s.op} | {list(s.data_shape[1:])} | "
                f"{list(s.weight_shape) if s.weight_shape else '-'} | {list(s.out_shape[1:])} | "
                f"{100 * s.flops_share:.1f}% |"
            )
        return "\n".join(rows)

    # ------------------------------------------------------------------ calling
    def _leaves(self, params) -> list[jax.Array]:
        leaves, treedef = jax.tree.flatten(params)
        if treedef != self._treedef:
            raise ValueError(
                f"params have another structure than the ones quantize() traced: {treedef} "
                f"vs {self._treedef}"
            )
        for leaf, aval in zip(leaves, self._param_avals, strict=True):
            if tuple(jnp.shape(leaf)) != tuple(aval.shape):
                raise ValueError(
                    f"a parameter has shape {jnp.shape(leaf)}, quantize() traced {aval.shape}"
                )
        return leaves

    def _check_x(self, x) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim < 1 or tuple(x.shape[1:]) != tuple(self._x_aval.shape[1:]):
            raise ValueError(
                f"x must be [B, {', '.join(map(str, self._x_aval.shape[1:]))}] like the example "
                f"quantize() traced, got shape {x.shape}; call quantize() again with an "
                "example of the new shape"
            )
        return x.astype(self._x_aval.dtype)

    def _check_bits(self, bits, batch: int) -> jax.Array:
        bits = jnp.asarray(bits)
        if not jnp.issubdtype(bits.dtype, jnp.integer):
            raise TypeError(f"bits must be an integer array, got dtype {bits.dtype}")
        if bits.shape != (batch, self.num_sites):
            raise ValueError(
                f"bits must be [B, L] = [{batch}, {self.num_sites}] for sites "
                f"{list(self.site_names)}, got shape {bits.shape}"
            )
        return bits

    def __call__(
        self,
        params: Any,
        x: ArrayLike,
        bits: ArrayLike | None = None,
        *,
        mode: Literal["fake", "integer"] = "fake",
    ) -> Any:
        """Evaluates the program.

        Args:
          params: a pytree like the one given to :func:`quantize` (may be traced).
          x: ``[B, ...]``, each example shaped like the traced example.
          bits: int ``[B, L]`` activation bit-widths (traced or not), or ``None`` for full
            precision (``fn(params, x)`` itself, statically chosen). For ``P`` policies use
            ``jax.vmap(lambda b: qfn(params, x, b))(bits_pbl)``.
          mode: ``"fake"``: fake quantization in float (differentiable, straight-through);
            ``"integer"``: every site computed on integer codes with int32 accumulation
            (``preferred_element_type``), then rescaled by the activation and weight scales
            (needs ``weight_bits``; the first layer, which is not a site, stays in float).

        Returns:
          ``fn``'s output pytree, every leaf ``[B, ...]``.
        """
        if bits is None:
            return self.fn(params, x)
        if mode not in ("fake", "integer"):
            raise ValueError(f"mode must be 'fake' or 'integer', got {mode!r}")
        if mode == "integer" and self.weight_bits is None:
            raise ValueError("integer mode needs quantized weights (weight_bits is None)")
        x = self._check_x(x)
        bits = self._check_bits(bits, x.shape[0])
        leaves = self._leaves(params)
        batched = self.batched_program(x.shape[0])
        if batched is not None:  # the program traced at this batch size: no vmap needed
            outs = evaluate_segments(batched, leaves, (x,), bits, 0, len(batched.seg_ops) - 1, mode)
            return jax.tree.unflatten(self._out_tree, list(outs))
        last = len(self._program.seg_ops) - 1
        run = lambda xi, bi: self._segments(leaves, (xi[None],), bi, 0, last, mode)
        outs = jax.vmap(run)(x, bits)
        return jax.tree.unflatten(self._out_tree, [o[:, 0] for o in outs])

    def batched_program(self, batch: int) -> Program | None:
        """The program traced at ``batch`` with every site's batch axis located, if it can be.

        Gradients through the vmapped per-example program cost up to ~1.4x more on XLA:CPU
        (the backward pass of per-example quantizers does not fuse as well), so where the
        batched trace is the same program as the per-example one and every site's batch axis
        is found by comparing the two, the batched program runs instead: the same ops with the
        ranges reduced per slice of that axis. ``None``: fall back to the vmapped program
        (which :meth:`run_segments` over all segments always runs).

        Returns:
          The batched :class:`~ptq_adversary.transform.program.Program` (read-only, cached per
          ``batch``), whose ``batch_axes`` maps each site's op index to ``(the batch axis of
          each data operand, the output's batch axis)``; or ``None``.
        """
        if batch not in self._batched:
            x_aval = jax.ShapeDtypeStruct((batch, *self._x_aval.shape[1:]), self._x_aval.dtype)
            try:
                builder, ops, param_ids, x_id, out_refs, _, _ = flatten(
                    self.fn, self._treedef, self._param_avals, x_aval, self._options
                )
            except (TransformError, ValueError, TypeError):
                self._batched[batch] = None
                return None
            axes = batch_axes(self._program, ops, builder.avals, batch)
            self._batched[batch] = None if axes is None else make_program(
                builder, ops, param_ids, x_id, out_refs,
                self._program.site_ops, self._program.weight_bits, axes,
            )  # fmt: skip
        return self._batched[batch]

    def _segments(self, leaves, live_in, bits_l, start: int, stop: int, mode: str):
        """Segments ``start..stop`` of one example: values live at ``start`` in, at ``stop`` out."""
        return evaluate_segments(self._program, leaves, live_in, bits_l, start, stop, mode)

    # ------------------------------------------------------------------ prefix cuts
    @property
    def num_segments(self) -> int:
        """``L + 1``: segment 0 runs up to the first site's quantizer, segment ``k`` from site
        ``k - 1``'s quantizer to site ``k``'s (the last one to the output)."""
        return len(self._program.seg_ops)

    def run_segments(
        self,
        params: Any,
        live: Any,
        site_bits: ArrayLike,
        start: int,
        stop: int,
        *,
        mode: Literal["fake", "integer"] = "fake",
    ) -> Any:
        """Runs segments ``start..stop`` (inclusive) on a batch, in quantized mode.

        Args:
          params: as for ``__call__``.
          live: the batch's values live at the cut before segment ``start``: ``x [B, ...]``
            for ``start == 0``, else the tuple this method returned for segment ``start - 1``.
          site_bits: int ``[B, L]`` or ``[L]`` (one allocation for every example); only the
            columns of the sites in the segments are read.
          start, stop: segment indices, ``0 <= start <= stop <= L``.
          mode: as for ``__call__``.

        Returns:
          The tuple of values live after segment ``stop`` (each ``[B, ...]``), or, when
          ``stop == L``, ``fn``'s output pytree.
        """
        leaves, live, site_bits, lift = self._segment_inputs(params, live, site_bits, start, stop)
        run = lambda lv, b: self._segments(leaves, lift(lv), b, start, stop, mode)
        outs = jax.vmap(run)(live, site_bits)
        if stop == self.num_segments - 1:
            return jax.tree.unflatten(self._out_tree, [o[:, 0] for o in outs])
        return outs

    def _segment_inputs(self, params, live, site_bits, start: int, stop: int):
        """Checked inputs of :meth:`run_segments` / :meth:`bound_segments`: ``(leaves, live,
        site_bits [B, L], lift)``, ``lift`` mapping one example's live values to the traced
        per-example shapes (batch axis of size 1 for the input; others as the program has
        them; live values are stacked along a new leading axis)."""
        if not 0 <= start <= stop < self.num_segments:
            raise ValueError(f"segments must satisfy 0 <= {start} <= {stop} <= {self.num_sites}")
        leaves = self._leaves(params)
        live = (self._check_x(live),) if start == 0 else tuple(live)
        batch = jnp.shape(live[0])[0]
        site_bits = jnp.asarray(site_bits)
        if site_bits.ndim == 1:
            site_bits = jnp.broadcast_to(site_bits, (batch, self.num_sites))
        site_bits = self._check_bits(site_bits, batch)
        lift = (lambda lv: (lv[0][None],)) if start == 0 else (lambda lv: lv)
        return leaves, live, site_bits, lift

    def bound_segments(
        self, params: Any, live: Any, site_bits: ArrayLike, start: int, stop: int
    ) -> Any:
        """Encloses what segments ``start..stop`` compute for every allowed allocation.

        Interval bound propagation (IBP) through the same program as :meth:`run_segments`:
        the values live at the cut before ``start`` are exact; each site in the segments
        quantizes its data operand with an error bounded for *every* bit-width of at least
        ``site_bits[:, l]`` (the step is largest at the smallest one, and the range is bounded
        from the operand's enclosure); everything downstream is interval arithmetic, widened
        by the float rounding error of each operation, so the enclosure holds for the float
        program too (the certify tests check it against enumerated allocations).

        Args:
          params: as for ``__call__``.
          live: as for :meth:`run_segments` (exact values).
          site_bits: int ``[B, L]`` or ``[L]``: the smallest bit-width each site may take.
          start, stop: segment indices, ``0 <= start <= stop <= L``.

        Returns:
          ``(lo, hi)`` pairs: for ``stop == L`` a pair of ``fn``'s output pytrees (e.g. logit
          bounds ``[B, C]`` each), else a tuple with one ``(lo, hi)`` per live value.

        Raises:
          UnsupportedPrimitiveError: a primitive without an interval rule (the error names it
            and where it is).
        """
        leaves, live, site_bits, lift = self._segment_inputs(params, live, site_bits, start, stop)
        run = lambda lv, b: bound_segments(self._program, leaves, lift(lv), b, start, stop)
        outs = jax.vmap(run)(live, site_bits)
        if stop == self.num_segments - 1:
            lo = jax.tree.unflatten(self._out_tree, [o[0][:, 0] for o in outs])
            hi = jax.tree.unflatten(self._out_tree, [o[1][:, 0] for o in outs])
            return lo, hi
        return outs

    def bound_margins(
        self,
        params: Any,
        live: Any,
        labels: ArrayLike,
        site_bits: ArrayLike,
        start: int,
        *,
        choices: Sequence[int] | None = None,
        remaining: ArrayLike | None = None,
    ) -> jax.Array:
        """Lower bounds of the logit margins ``logit[y] - logit[j]`` over allowed allocations.

        From the exact values live at the cut before segment ``start`` to the logits (``fn``
        must return one ``[B, C]`` array). Intervals alone (:meth:`bound_segments`, every site
        at its ``site_bits``) give ``lo[y] - hi[j]``. With ``choices`` and ``remaining`` the
        allocations are those whose sites ``start - 1 ..`` take bits in ``choices`` summing to
        ``remaining`` exactly, and a linear relaxation (CROWN-style, see
        :mod:`~ptq_adversary.transform.linear_bounds`) is added: the margin itself is
        propagated backward as a linear function, and the site terms are minimised jointly
        under the budget; the larger of the two bounds is returned (both are sound).

        Args:
          params, live: as for :meth:`run_segments` (``start >= 1``).
          labels: int ``[B]``.
          site_bits: int ``[B, L]``: each site's smallest allowed bit-width.
          start: the segment to start from.
          choices: the bit choices (static); remaining: int ``[B]``.

        Returns:
          float ``[B, C]``: the lower bounds; ``+inf`` at ``j == y``.
        """
        if not 1 <= start < self.num_segments:
            raise ValueError(f"start must be in [1, {self.num_sites}], got {start}")
        leaves = self._leaves(params)
        live = tuple(live)
        batch = jnp.shape(live[0])[0]
        site_bits = self._check_bits(jnp.asarray(site_bits), batch)
        labels = jnp.asarray(labels, jnp.int32)
        linear = choices is not None
        if linear:
            choices = tuple(int(c) for c in choices)
            remaining = jnp.broadcast_to(jnp.asarray(remaining, jnp.int32), (batch,))
        else:
            remaining = jnp.zeros((batch,), jnp.int32)
        one = lambda lv, b, y, rem: margin_bounds(
            self._program, leaves, lv, b, y, rem, start, choices, self.num_sites
        )
        return jax.vmap(one)(live, site_bits, labels, remaining)


def _example_pair(x: jax.Array) -> jax.Array:
    if x.shape[0] >= 2:
        return x[:2]
    return jnp.concatenate([x, 0.5 * x[::-1] + 0.25])


def check_per_example(qfn: QuantizedFn, params, x: jax.Array) -> None:
    """Refuses programs whose batched output differs from the per-example program's.

    ``x``: ``[B, ...]``, ``B >= 1`` (two examples are compared; one is made up from the first
    if ``B == 1``). Both run in full precision (no quantizer).

    Raises:
      TransformError: ``fn`` mixes examples (e.g. BatchNorm with batch statistics).
    """
    pair = _example_pair(x)
    batched = jax.tree.leaves(qfn.fn(params, pair))
    leaves = qfn._leaves(params)
    last = qfn.num_segments - 1
    one = lambda xi: qfn._segments(leaves, (xi[None],), None, 0, last, "fake")
    per_example = jax.vmap(one)(pair)
    for a, b in zip(batched, per_example, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b[:, 0], np.float64)
        if a.shape != b.shape or not np.allclose(
            a, b, rtol=1e-4, atol=1e-5 * (1 + np.abs(a).max())
        ):
            diff = np.abs(a - b).max() if a.shape == b.shape else f"shapes {a.shape} vs {b.shape}"
            raise TransformError(
                "fn mixes examples: on a batch of 2 its output differs from the same program "
                f"run on each example alone (max difference {diff}). Quantized evaluation is per "
                "example; run fn in inference mode (BatchNorm on running statistics: "
                "train=False / use_running_average=True for linen, model.eval() for NNX)"
            )
