r"""Seeds: the whole pipeline over N seeds, then every headline number as mean ± 95 % CI.

  python experiments/seeds.py --workdir=runs/seeds [--num_seeds=3 | --seeds 0 1 2]
      [--aggregate_only]

Runs ``ptq_adversary.training.pipeline.run_pipeline`` with ``configs/fmnist_pair.py`` (default
args) and ``config.seed = s`` in ``WORKDIR/seed_<s>`` for each seed, one after another. Finished
stages are skipped, so rerunning (or pointing it at seed directories made by
``python -m ptq_adversary.main --config=configs/fmnist_pair.py --config.seed=<s>
--workdir=WORKDIR/seed_<s>``) only runs what is missing. Then aggregates the headline numbers of
every ``WORKDIR/seed_*/results.json`` (teacher and student accuracy; per pair FP and DPTQ
accuracy, drop, uniform and random drops, flip rate; max FP gap) as mean ± 95 % Student-t
interval (n - 1 dof) into ``WORKDIR/seeds.json``, ``seeds.csv`` and ``seeds.md``.

The seed fixes the initialisation, the batch order and every sampled allocation; the data split
(``data.split_seed``) stays the same for all seeds, so the test set is the same 10 000 images.
Runtime: ~17-25 min per seed on the 2-core development CPU.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptq_adversary import config as config_lib  # noqa: E402
from ptq_adversary import io, report  # noqa: E402
from ptq_adversary.training import pipeline  # noqa: E402

CONFIG = REPO / "configs" / "fmnist_pair.py"
CONFIG_ARG = None  # the default pipeline: both pairs, budget 4, all stages

#: Where seed ``s`` runs: ``WORKDIR/seed_<s>``. The report reads this layout by default
#: (``report.SEEDS_LAYOUT``); a script with another layout passes its own to
#: ``report.find_runs`` / ``report.build_report`` (``--runs`` on the command line).
LAYOUT = report.RunLayout("seed_{}")


def overrides(seed: int) -> dict:
    """The only fields a seed run changes in the config."""
    return {"seed": seed}


def run_seed(workdir: str, seed: int) -> dict:
    config = config_lib.load_config_file(str(CONFIG), CONFIG_ARG)
    for field, value in overrides(seed).items():
        config[field] = value
    return pipeline.run_pipeline(config, LAYOUT.run_dir(workdir, seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="explicit seeds")
    parser.add_argument(
        "--aggregate_only", action="store_true", help="do not run the pipeline, only aggregate"
    )
    args = parser.parse_args()
    seeds = args.seeds if args.seeds is not None else list(range(args.num_seeds))
    if not args.aggregate_only:
        for seed in seeds:
            run_seed(args.workdir, seed)
    results = {}
    for seed in seeds:
        path = os.path.join(LAYOUT.run_dir(args.workdir, seed), report.RESULTS)
        if os.path.exists(path):
            results[LAYOUT.run_name(seed)] = io.read_json(path)
    if not results:
        sys.exit(f"error: no {LAYOUT.pattern}/{report.RESULTS} in {args.workdir} for seeds {seeds}")
    summary = report.write_seeds_summary(results, args.workdir)
    print(open(os.path.join(args.workdir, "seeds.md"), encoding="utf-8").read())
    del summary


if __name__ == "__main__":
    main()
