r"""The paper's setting: CIFAR-10, ResNet-18 student, WRN-16-4 teacher -- for a GPU.

Command (CIFAR-10 must be loadable by tfds: online, or prepared offline: docs/CONFIGS.md)::

  python -m ptq_adversary.main --config=configs/cifar10_pair.py --workdir=runs/cifar10_pair

Args: as configs/fmnist_pair.py (``smoke``, ``mode``, ``budget``, ``stage``).

What it reproduces: Frank & Ardis (arXiv 2510.02457), ResNet-18: the detrimental pair lost
24.39 % under DPTQ and the robust pair 0.22 % at similar FP accuracy. Stages and losses are
those of configs/fmnist_pair.py (which this file starts from); only the data, the
architectures and the schedules change. The teacher is configs/cifar10_resnet18.py with
``model=wrn16_4``.

Not run: the development machine has neither CIFAR-10 nor a GPU, so no accuracy or runtime is
claimed here. Known limitation: stage A caches the teacher's logits on un-augmented images, so
the student trains without augmentation (the paper does not say how its student was trained).
"""

import os

import ml_collections

from ptq_adversary import config as config_lib

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, smoke=False, mode="both", budget=4.0, stage="all")
    smoke = ",smoke" if arg.smoke else ""
    config = config_lib.load_config_file(
        os.path.join(_HERE, "fmnist_pair.py"),
        f"mode={arg.mode},budget={arg.budget},stage={arg.stage}{smoke}",
    )
    teacher = config_lib.load_config_file(
        os.path.join(_HERE, "cifar10_resnet18.py"), f"model=wrn16_4{smoke}"
    )
    for shared in ("data", "eval", "log", "ckpt"):
        config[shared] = teacher[shared]
    config.teacher.model = teacher.model
    config.teacher.optim = teacher.optim

    config.student.model.name = "resnet18"
    config.student.model.factory = ""  # "package.module:function": your own nnx.Module instead
    config.student.model.kwargs = ml_collections.ConfigDict()
    config.student.optim.optimizer = "sgd"
    config.student.optim.momentum = 0.9
    config.student.optim.learning_rate = 0.05
    config.student.optim.num_epochs = 60.0
    config.pairs.optim.batch_size = 128
    config.pairs.optim.num_epochs = 5.0
    config.pairs.pair.quant_batch = 64
    config.pairs.eval_every_steps = 500
    if arg.smoke:
        config.student.model.kwargs.width = 0.125
        config.student.optim.batch_size = 32
        config.student.optim.num_epochs = 1.0
        config.pairs.optim.batch_size = 16
        config.pairs.pair.quant_batch = 8
        config.pairs.eval_every_steps = 4
    return config
