r"""Supervised CIFAR-10 training with the paper's architecture (ResNet-18), for a GPU.

Command (needs CIFAR-10 prepared by tfds: online, or offline from a prepared data_dir, see
docs/CONFIGS.md, "Data")::

  python -m ptq_adversary.main --config=configs/cifar10_resnet18.py --workdir=runs/c10_r18
  python -m ptq_adversary.main --config=configs/cifar10_resnet18.py:model=wrn16_4 \
      --workdir=runs/c10_teacher   # the stronger stage-A teacher

Args:
  smoke: tiny widths and a few steps on random-free real data slices (needs the data).
  model: ``resnet18`` (the paper's student; 20 sites), ``wrn16_4`` (teacher), ``resnet20``.
  epochs: training epochs.

What it reproduces: the setting of the paper's headline ResNet-18 result (Frank & Ardis 2025:
24.39 % DPTQ drop for the detrimental pair vs 0.22 % for the robust one at similar FP
accuracy). This config trains the FP network (teacher or supervised baseline); the pair
pipeline builds on it. Not run here: no CIFAR-10 and no GPU on the development machine, so no
accuracy or runtime is claimed. Typical CIFAR ResNet-18 recipes reach ~94-95 % in 100-200
epochs (reference expectation, not a measurement of this code).
"""

import ml_collections

from ptq_adversary import config as config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, smoke=False, model="resnet18", epochs=100.0)
    config = ml_collections.ConfigDict()
    config.trainer = "supervised"
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "cifar10"
    config.data.data_dir = ml_collections.config_dict.placeholder(str)
    config.data.val_size = 5000
    config.data.split_seed = 0
    config.data.train_limit = ml_collections.config_dict.placeholder(int)
    config.data.test_limit = ml_collections.config_dict.placeholder(int)
    config.data.augment = True
    config.data.flip = True

    config.model = ml_collections.ConfigDict()
    config.model.name = arg.model
    config.model.weight_bits = 8
    config.model.factory = ""  # "package.module:function": your own nnx.Module instead
    config.model.kwargs = ml_collections.ConfigDict()

    config.optim = ml_collections.ConfigDict()
    config.optim.optimizer = "sgd"
    config.optim.learning_rate = 0.1
    config.optim.weight_decay = 5e-4
    config.optim.momentum = 0.9
    config.optim.warmup_fraction = 0.02
    config.optim.label_smoothing = 0.0
    config.optim.batch_size = 128
    config.optim.num_epochs = arg.epochs
    config.optim.num_steps = ml_collections.config_dict.placeholder(int)
    config.optim.grad_clip_norm = ml_collections.config_dict.placeholder(float)

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 1000
    config.eval.every_steps = 2000
    config.eval.uniform_bits = (8, 6, 4)

    config.log = ml_collections.ConfigDict()
    config.log.every_steps = 100
    config.log.progress = True
    config.log.tensorboard = True

    config.ckpt = ml_collections.ConfigDict()
    config.ckpt.every_steps = 1000
    config.ckpt.max_to_keep = 2

    if arg.smoke:
        config.data.train_limit = 256
        config.data.test_limit = 128
        config.data.val_size = 128
        config.model.kwargs.width = 0.125
        config.optim.batch_size = 32
        config.optim.num_epochs = 1.0
        config.eval.batch_size = 64
        config.eval.every_steps = 4
        config.log.every_steps = 4
        config.ckpt.every_steps = 4
    return config
