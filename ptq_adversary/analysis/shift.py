"""Distribution shift: FP and greedy-DPTQ accuracy of pairs under every corruption.

:func:`evaluate_corruptions` corrupts the test images with every corruption of
:mod:`ptq_adversary.corruptions` at every severity and runs each pair on them (its policy picks
its allocation for the corrupted image).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ptq_adversary import artifacts, corruptions, data, policy
from ptq_adversary.analysis import inference

__all__ = ["evaluate_corruptions"]


def _corrupt_fn(name: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    return jax.jit(lambda key, x, severity: corruptions.apply(name, key, x, severity))


def evaluate_corruptions(
    pairs: Mapping[str, tuple[artifacts.LoadedModel, artifacts.LoadedPolicy]],
    split: data.Split,
    stats: data.DatasetStats | data.Dataset,
    *,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    batch_size: int = 1000,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """FP and greedy-DPTQ accuracy of each pair under each corruption and severity.

    Every image is corrupted on the ``[0, 1]`` pixel scale, then normalised exactly as
    :func:`data.normalize` does (severity 0, the clean row, reproduces stage C's inputs bit for
    bit). The policy sees the corrupted image too, so its allocation may change. Batch ``i`` of
    corruption ``c`` uses the key ``fold_in(fold_in(PRNGKey(seed), c), i)`` at every severity
    (common random numbers: a higher severity scales the same noise), and all pairs see the
    same corrupted images.

    Args:
      pairs: name -> (model, policy).
      split: the examples (uint8 images); stats: normalisation mean/std.
      names: corruptions to run (default: all of :data:`corruptions.CORRUPTIONS`).
      severities: severities per corruption; the clean row (``corruption='clean'``,
        severity 0) is always evaluated once.
      batch_size: inputs per call.
      seed: base of the corruption keys.
      progress: called with a short line after each condition (e.g. ``print``).

    Returns:
      One row per (corruption, severity, pair): ``corruption``, ``family``, ``severity``,
      ``param``, ``unit``, ``pair``, ``fp_accuracy``, ``dptq_accuracy``, ``drop`` (points),
      ``flip_rate`` (FP right, DPTQ wrong, over all inputs), ``allocation_change_rate``
      (inputs whose greedy allocation differs from their clean one), ``mean_bits``.
    """
    names = tuple(names) if names is not None else corruptions.names()
    mean, std = np.asarray(stats.mean, np.float32), np.asarray(stats.std, np.float32)
    raw = split.images.astype(np.float32) / np.float32(255.0)  # exact: x * 255 == pixel
    labels = split.labels
    n = len(labels)

    def run(corrupt) -> dict[str, dict[str, np.ndarray]]:
        outs: dict[str, list] = {p: [] for p in pairs}
        for i, (start, stop, pad) in enumerate(data.padded_batches(n, batch_size)):
            x = data.pad_rows(raw[start:stop], pad)
            x = np.asarray(corrupt(i, x)) if corrupt is not None else x
            x = data.normalize(x * np.float32(255.0), mean, std)
            for p, (model, pol) in pairs.items():
                o = inference.pair_forward(
                    model.params,
                    model.rest,
                    pol.params,
                    pol.rest,
                    x,
                    graphdef=model.graphdef,
                    policy_graphdef=pol.graphdef,
                    budget=pol.spec.budget_spec,
                )
                outs[p].append(tuple(np.asarray(a)[: stop - start] for a in o))
        return {
            p: dict(
                zip(
                    ("fp", "q", "idx"),
                    (np.concatenate(c) for c in zip(*o, strict=True)),
                    strict=True,
                )
            )
            for p, o in outs.items()
        }

    rows: list[dict[str, Any]] = []

    def add_rows(name, family, severity, param, unit, result, clean):
        for p, (_, pol) in pairs.items():
            r = result[p]
            fp_right = r["fp"].argmax(-1) == labels
            q_right = r["q"].argmax(-1) == labels
            rows.append(
                {
                    "corruption": name,
                    "family": family,
                    "severity": int(severity),
                    "param": param,
                    "unit": unit,
                    "pair": p,
                    "fp_accuracy": float(fp_right.mean()),
                    "dptq_accuracy": float(q_right.mean()),
                    "drop": float(100.0 * (fp_right.mean() - q_right.mean())),
                    "flip_rate": float((fp_right & ~q_right).mean()),
                    "allocation_change_rate": float(np.any(r["idx"] != clean[p]["idx"], -1).mean()),
                    "mean_bits": float(
                        np.asarray(
                            policy.to_bits(r["idx"], pol.spec.budget_spec), np.float64
                        ).mean()
                    ),
                }
            )

    clean = run(None)
    add_rows("clean", "clean", 0, 0.0, "", clean, clean)
    if progress:
        progress(f"clean: {len(rows)} rows")
    for c_index, name in enumerate(names):
        c = corruptions.CORRUPTIONS[name]
        corrupt_fn = _corrupt_fn(name)
        base = jax.random.fold_in(jax.random.PRNGKey(seed), c_index)
        for severity in severities:
            result = run(
                lambda i, x, s=severity, f=corrupt_fn, k=base: f(
                    jax.random.fold_in(k, i), x, jnp.int32(s)
                )
            )
            param = float(c.params[severity - 1]) if severity > 0 else 0.0
            add_rows(name, c.family, severity, param, c.unit, result, clean)
            if progress:
                accs = ", ".join(
                    f"{r['pair']} FP {r['fp_accuracy']:.3f} DPTQ {r['dptq_accuracy']:.3f}"
                    for r in rows[-len(pairs) :]
                )
                progress(f"{name} s{severity}: {accs}")
    return rows
