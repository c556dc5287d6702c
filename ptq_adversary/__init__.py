"""ptq_adversary: how badly can dynamic post-training quantization fail?

Bit-widths are data: traced integer arrays ``[B, L]`` (or ``[P, B, L]`` for P policies)
threaded through a functional forward pass, so one compile serves every allocation.

Modules: ``quant`` (fake quantizers), ``layers`` and ``models`` (quantizable flax.nnx models),
``data`` (offline-first datasets), ``steps`` (pure step builders), ``trainers`` (training loops),
``checkpoint``, ``metrics``, ``config_lib``, ``main`` (the command line).
"""

__version__ = "0.1.0"
