"""ptq_adversary: how badly can dynamic post-training quantization fail?

Bit-widths are data: traced integer arrays ``[B, L]`` (or ``[P, B, L]`` for P policies), so one
compile serves every allocation. The quantization sites are derived from a model's program by
a transformation (``transform.quantize``), so any JAX model enters: flax.linen, flax.nnx or
plain ``jax.numpy`` code.

The map, from the bottom of the import graph up: each entry imports only entries before it
(``tests/test_layout.py`` checks the graph; ``docs/DESIGN.md`` lists the submodules).

* ``quant``: the fake and integer quantizers, bit-widths as traced arrays.
* ``io`` (atomic writes, JSON reads), ``backend`` (every per-backend tuning table),
  ``plotting`` (matplotlib on demand).
* ``transform/``: dynamic PTQ as a program transformation, and sound bounds on its programs.
* ``models/``: the registry, ``QuantizedModel``, the functional boundary, the zoo.
* ``policy/``: budgets, the masked allocation distribution, the policy network.
* ``losses``, ``steps/`` (pure step builders), ``data/`` (offline-first datasets and batching),
  ``distributed`` (multi-process rows and agreement), ``corruptions`` (image corruptions).
* ``metrics``, ``checkpoint``, ``artifacts``, ``evaluation`` (stage C of the method).
* ``audit/``: the worst case of any trained model (searches, enumeration, certify, reports).
* ``analysis/`` and ``report/``: where and why a pair fails, as tables and plots.
* ``config/``: config arguments, public rule primitives, the trainers' rule registry.
* ``training/``: the loop, the shared toolkit and the trainers (each registers its rules).
* ``cli`` (the command line), with ``main`` its entry point: ``python -m ptq_adversary.main``.

Public entry points that stay put: ``quant.fake_quant_activation``, ``transform.quantize``,
``models.create_model``, ``audit.audit``.
"""

__version__ = "0.1.0"
