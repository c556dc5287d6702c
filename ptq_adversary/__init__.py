"""ptq_adversary: how badly can dynamic post-training quantization fail?

Bit-widths are data: traced integer arrays ``[B, L]`` (or ``[P, B, L]`` for P policies), so one
compile serves every allocation. The quantization sites are derived from a model's program by
a transformation (``transform.quantize``), so any JAX model enters: flax.linen, flax.nnx or
plain ``jax.numpy`` code.

Modules: ``quant`` (fake quantizers), ``transform`` (dynamic PTQ as a program transformation),
``zoo`` (the built-in plain-NNX networks), ``models`` (registry, ``QuantizedModel`` and the
functional boundary), ``policy`` and ``policy_net`` (budgeted bit-width policies), ``losses``,
``steps`` (pure step builders), ``training`` (the loop and the trainers), ``evaluation``,
``analysis``, ``corruptions``, ``audit`` (worst case of any trained model), ``certify`` (its
proof: bounds and branch and bound over allocations), ``report``, ``data`` (offline-first
datasets), ``artifacts``, ``checkpoint``, ``metrics``, ``config`` (config args, rules and
validation), ``cli`` (the command line; ``main`` is its entry point).
"""

__version__ = "0.1.0"
