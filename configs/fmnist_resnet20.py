r"""The paper's pipeline with a ResNet-20 student on real Fashion-MNIST, sized for 2 CPU cores.

Command::

  python -m ptq_adversary.main --config=configs/fmnist_resnet20.py --workdir=runs/fmnist_resnet20

Args: those of ``configs/fmnist_pair.py`` (``smoke``, ``mode``, ``budget``, ``stage``).

Same teacher (``teacher_cnn``, 5 epochs), data, choices {2,3,4,5,6,8}, budget 4 and 8-bit
weights as ``configs/fmnist_pair.py``; the white-box student is the zoo's ``resnet20`` (3 stages
of 3 basic blocks, 16/32/64 channels, 272k parameters) with 21 quantization sites derived from
its program: 18 block convolutions, 2 projection shortcuts and the head.

Settings: every stage setting equals ``configs/fmnist_pair.py``'s (student 4 epochs, P = 8
allocations per input, 1 epoch of stage B per pair, validation every 100 steps), so the two
architectures differ only in the student. Should a slower machine need less time, lower
``pairs.pair.num_samples`` first (the stage-B step costs about linearly in P), then
``pairs.optim.num_steps``.

Measured so far (2026-12-01, 2-core AMD EPYC VM, no GPU, jax 0.10.2, other jobs on the same
cores): the teacher stage was reused from configs/fmnist_pair.py's seed-0 run (identical
teacher config; 474 s there); stage A 1716 steps in 1182 s, student test accuracy 90.64 %
(uniform 8/6/4-bit DPTQ 90.67 / 90.64 / 89.85 %); stage B ran at 1.7-2.0 s per step with
other jobs on the cores (about 29 min for the robust pair's 859 steps).
"""

import os

import ml_collections

from ptq_adversary import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fmnist_pair.py")
    config = config_lib.load_config_file(path, arg)
    config.student.model.name = "resnet20"
    if config_lib.parse_arg(arg, smoke=False, mode="both", budget=4.0, stage="all").smoke:
        config.student.model.kwargs = ml_collections.ConfigDict({"width": 0.25})
    return config
