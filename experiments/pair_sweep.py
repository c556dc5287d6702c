r"""Stage-B variants on one shared teacher and student: what the default pair config rests on.

Each entry of ``SWEEP`` is (name, mode, overrides of configs/fmnist_pair.py). Every variant
runs in ``OUT/<name>`` with the teacher and student of ``BASE`` linked in, so only stage B
(and its stage-C evaluation) runs; a summary table goes to ``OUT/summary.md``.

  python experiments/pair_sweep.py --base=runs/fmnist_pair --out=runs/sweep [--only NAME ...]

``BASE`` must hold finished ``teacher/`` and ``student/`` stages, e.g. from
``python -m ptq_adversary.main --config=configs/fmnist_pair.py:stage=student
--workdir=runs/fmnist_pair``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptq_adversary.training import pipeline  # noqa: E402

# (name, mode, {dotted field: value}) -- explicit, so a results table can cite its row.
SWEEP: list[tuple[str, str, dict]] = [
    ("robust_lambda1", "robust", {"pairs.per_mode.robust.quant_weight": 1.0}),
    ("robust_lambda0.1", "robust", {"pairs.per_mode.robust.quant_weight": 0.1}),
    ("detrimental_lambda1", "detrimental", {"pairs.per_mode.detrimental.quant_weight": 1.0}),
    ("detrimental_lambda0.3", "detrimental", {"pairs.per_mode.detrimental.quant_weight": 0.3}),
    ("detrimental_lambda0.1", "detrimental", {"pairs.per_mode.detrimental.quant_weight": 0.1}),
]


def _load_config(mode: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fmnist_pair", REPO / "configs" / "fmnist_pair.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f"mode={mode},stage={mode}")


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def run_variant(name: str, mode: str, overrides: dict, base: str, out: str) -> dict:
    workdir = os.path.join(out, name)
    os.makedirs(workdir, exist_ok=True)
    for stage in ("teacher", "student"):
        link = os.path.join(workdir, stage)
        if not os.path.exists(link):
            os.symlink(os.path.abspath(os.path.join(base, stage)), link)
    config = _load_config(mode)
    for dotted, value in overrides.items():
        _set(config, dotted, value)
    config.log.tensorboard = False
    return pipeline.run_pipeline(config, workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    rows = []
    for name, mode, overrides in SWEEP:
        if args.only and name not in args.only:
            continue
        r = run_variant(name, mode, overrides, args.base, args.out)
        t = r["test"]
        rows.append(
            f"| {name} | {json.dumps(overrides)} | {t['fp_accuracy']:.2%} | "
            f"{t['dptq_accuracy']:.2%} | {t['drop']:.2f} | {t['uniform_drop']:.2f} | "
            f"{t['random_drop']:.2f} | {r['best_step']} | {r['train_time_s']:.0f} |"
        )
    header = (
        "| variant | overrides | FP acc | DPTQ acc | drop | uniform drop | random drop | "
        "best step | train s |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    text = header + "\n".join(rows) + "\n"
    with open(os.path.join(args.out, "summary.md"), "a", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
