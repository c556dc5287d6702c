r"""The paper's pipeline on real Fashion-MNIST, sized for 2 CPU cores: teacher -> student ->
robust and detrimental pairs -> stage-C table.

Command::

  python -m ptq_adversary.main --config=configs/fmnist_pair.py --workdir=runs/fmnist_pair

Args (``--config=configs/fmnist_pair.py:mode=detrimental,budget=4``):
  smoke: tiny slices and models, a few steps per stage (tests and CI).
  mode: ``both`` (default), ``robust`` or ``detrimental``.
  budget: mean activation bits per site (every allocation meets it exactly).
  stage: ``all`` (default) or one of teacher, student, robust, detrimental, evaluate.

What it reproduces: Frank & Ardis (arXiv 2510.02457), the detrimental vs robust pair at a fixed
bit budget: detrimental pairs lose 10-65 % under DPTQ and robust ones < 2 % at similar FP
accuracy (ResNet-18/CIFAR-10: 24.39 % vs 0.22 %). Here: the 4-site CNN student on
Fashion-MNIST, choices {2,3,4,5,6,8}, budget 4, 8-bit weights.

Measured with this config (2026-12-01, seed 0 of experiments/seeds.py; 2-core AMD EPYC VM, no
GPU, jax 0.10.2, commit bd4e346, other jobs on the same cores), test set:
  teacher 91.05 %; student 89.07 %;
  robust pair:      FP 88.90 %, DPTQ 88.87 %, drop 0.03 pts (uniform 0.02, random 7.22);
  detrimental pair: FP 88.66 %, DPTQ 10.21 %, drop 78.45 pts (uniform 2.89, random 23.92);
  max FP gap 0.41 pts; wall time 15.7 min (teacher 474 s, student 174 s, pairs 145 + 148 s).
Over seeds 0-2: robust drop 0.19 ± 0.68, detrimental drop 78.32 ± 1.36 points (docs/RESULTS.md).
"""

import os

import ml_collections

from ptq_adversary import config as config_lib


def _teacher_config(smoke: bool) -> ml_collections.ConfigDict:
    # The teacher is exactly configs/fmnist_cnn.py's default model: one source of truth.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fmnist_cnn.py")
    return config_lib.load_config_file(path, "smoke" if smoke else None)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, smoke=False, mode="both", budget=4.0, stage="all")
    base = _teacher_config(arg.smoke)
    config = ml_collections.ConfigDict()
    config.trainer = "pipeline"
    config.stage = arg.stage
    config.modes = ("robust", "detrimental") if arg.mode == "both" else (arg.mode,)
    config.seed = 0
    for shared in ("data", "eval", "log", "ckpt"):
        config[shared] = base[shared]

    config.teacher = ml_collections.ConfigDict()
    config.teacher.model = base.model
    config.teacher.optim = base.optim

    # Stage A: the white-box student learns from the teacher's logits only.
    config.student = ml_collections.ConfigDict()
    config.student.model = ml_collections.ConfigDict()
    config.student.model.name = "cnn"
    config.student.model.weight_bits = 8
    config.student.model.factory = ""  # "package.module:function": your own nnx.Module instead
    config.student.model.kwargs = ml_collections.ConfigDict()
    config.student.optim = ml_collections.ConfigDict()
    config.student.optim.optimizer = "adamw"
    config.student.optim.learning_rate = 3e-3
    config.student.optim.weight_decay = 5e-4
    config.student.optim.warmup_fraction = 0.05
    config.student.optim.batch_size = 128
    config.student.optim.num_epochs = 4.0
    config.student.optim.num_steps = ml_collections.config_dict.placeholder(int)
    config.student.optim.grad_clip_norm = ml_collections.config_dict.placeholder(float)
    config.student.kd = ml_collections.ConfigDict()
    config.student.kd.temperature = 4.0
    config.student.kd.label_weight = 0.0  # black box: the teacher's outputs only

    # Stage B: both pairs start from the same student.
    config.pairs = ml_collections.ConfigDict()
    config.pairs.quant = ml_collections.ConfigDict()
    config.pairs.quant.choices = (2, 3, 4, 5, 6, 8)
    config.pairs.quant.budget = arg.budget
    config.pairs.policy = ml_collections.ConfigDict()
    config.pairs.policy.widths = (8, 16)
    config.pairs.policy.learning_rate = 3e-3
    config.pairs.pair = ml_collections.ConfigDict()
    config.pairs.pair.num_samples = 8  # P allocations per input, one vmapped evaluation
    config.pairs.pair.quant_batch = 32  # inputs per step that get the P quantized passes
    config.pairs.pair.temperature = 4.0
    config.pairs.pair.margin = 5.0  # m of the detrimental margin loss
    config.pairs.pair.reward = "kl"
    config.pairs.pair.entropy_coef = 0.01
    config.pairs.pair.fp_tolerance = 0.01  # matched pairs: FP val accuracy within 1 point
    config.pairs.pair.num_random_eval = 4
    # Per-mode settings of pairs.pair. lambda (quant_weight) was chosen on the validation
    # split with experiments/pair_sweep.py: lambda 1 keeps the robust drop lowest, while the
    # detrimental margin loss at lambda >= 0.3 costs FP accuracy beyond the 1-point tolerance.
    config.pairs.per_mode = ml_collections.ConfigDict()
    config.pairs.per_mode.robust = ml_collections.ConfigDict({"quant_weight": 1.0})
    config.pairs.per_mode.detrimental = ml_collections.ConfigDict({"quant_weight": 0.1})
    config.pairs.eval_every_steps = 100  # validation + matched-pair selection
    config.pairs.optim = ml_collections.ConfigDict()
    config.pairs.optim.optimizer = "adamw"
    config.pairs.optim.learning_rate = 1e-3
    config.pairs.optim.weight_decay = 0.0
    config.pairs.optim.warmup_fraction = 0.0
    config.pairs.optim.batch_size = 64
    config.pairs.optim.num_epochs = 1.0
    config.pairs.optim.num_steps = ml_collections.config_dict.placeholder(int)
    config.pairs.optim.grad_clip_norm = ml_collections.config_dict.placeholder(float)

    if arg.smoke:
        config.student.model.kwargs.widths = (4, 8, 8, 8)
        config.student.optim.batch_size = 32
        config.student.optim.num_epochs = 1.0
        config.pairs.policy.widths = (4,)
        config.pairs.pair.num_samples = 2
        config.pairs.pair.quant_batch = 8
        config.pairs.pair.num_random_eval = 2
        config.pairs.pair.fp_tolerance = 0.5
        config.pairs.optim.batch_size = 16
        config.pairs.optim.num_steps = 8
        config.pairs.eval_every_steps = 4
    return config
