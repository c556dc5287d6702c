r"""Supervised training on real Fashion-MNIST (default: the stage-A teacher), CPU-sized.

Command (2 CPU cores; Debian's dataset-fashion-mnist, no internet)::

  python -m ptq_adversary.main --config=configs/fmnist_cnn.py --workdir=runs/fmnist_teacher

Args (``--config=configs/fmnist_cnn.py:model=cnn,epochs=3``):
  smoke: tiny data slice, tiny model, a few steps (tests and CI; ~10 s).
  model: a registry name (``teacher_cnn`` default, ``cnn`` the small student architecture).
  epochs: training epochs.

Your own architecture: ``--config.model.factory=my_pkg.models:build`` (and
``--config.model.name=<a label>``), where ``build(num_classes=, in_channels=, rngs=,
**config.model.kwargs)`` returns a plain ``flax.nnx`` module; its quantization sites are derived
from its program (docs/DESIGN.md).

What it reproduces: the black-box teacher of the method's stage A (docs/METHOD.md). The paper
gives no number for its teacher; our requirement is >= 90 % Fashion-MNIST test accuracy.

Measured (2026-12-01, 2-core AMD EPYC VM, no GPU, jax 0.10.2, other jobs on the same cores),
default args: teacher_cnn (266 810 parameters, 5 sites), 5 epochs = 2145 steps at batch 128:
test accuracy 91.05 % (uniform 8-bit DPTQ 90.99 %, 4-bit 89.08 %), 455 s of training, 474 s
wall time in all (the teacher stage of ``configs/fmnist_pair.py``, seed 0 of
experiments/seeds.py); seeds 0-2: 91.04 ± 0.44 %.
"""

import ml_collections

from ptq_adversary import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, smoke=False, model="teacher_cnn", epochs=5.0)
    config = ml_collections.ConfigDict()
    config.trainer = "supervised"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "fashion_mnist"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    config.data.val_size = 5000
    config.data.split_seed = 0
    config.data.train_limit = ml_collections.config_dict.placeholder(int)
    config.data.test_limit = ml_collections.config_dict.placeholder(int)
    # Crop/flip augmentation cost ~1 point at this short schedule (90.4 % after 6 epochs with
    # it, in the first pipeline run, which had it on); without it 5 epochs suffice.
    config.data.augment = False
    config.data.flip = True

    config.model = ml_collections.ConfigDict()
    config.model.name = arg.model
    config.model.weight_bits = 8  # used by every DPTQ evaluation; training is full precision
    config.model.factory = ""  # "package.module:function": your own nnx.Module instead
    config.model.kwargs = ml_collections.ConfigDict()

    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "adamw"
    config.optim.learning_rate = 2e-3
    config.optim.weight_decay = 5e-4
    config.optim.warmup_fraction = 0.05
    config.optim.label_smoothing = 0.0
    config.optim.batch_size = 128
    config.optim.num_epochs = arg.epochs
    config.optim.num_steps = ml_collections.config_dict.placeholder(int)  # overrides epochs
    config.optim.grad_clip_norm = ml_collections.config_dict.placeholder(float)

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 500
    config.eval.every_steps = 1000
    config.eval.uniform_bits = (8, 6, 4)  # DPTQ accuracy with every site at these bits

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 50
    config.log.progress = True
    config.log.tensorboard = True

    config.ckpt = ml_collections.ConfigDict()
    config.ckpt.every_steps = 500
    config.ckpt.max_to_keep = 2

    if arg.smoke:
        config.data.train_limit = 256
        config.data.test_limit = 128
        config.data.val_size = 128
        config.model.kwargs.widths = (4, 8, 8, 8)
        if arg.model == "teacher_cnn":
            config.model.kwargs.hidden = 16
        config.optim.batch_size = 32
        config.optim.num_epochs = 2.0  # 16 steps
        config.eval.batch_size = 64
        config.eval.every_steps = 8
        config.log.every_steps = 4
        config.ckpt.every_steps = 8
    return config
