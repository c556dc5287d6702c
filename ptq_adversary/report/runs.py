"""Run discovery: which pipeline workdirs a report covers, and which pairs each one has.

A report covers one pipeline workdir (``DIR/results.json``, ``DIR/<mode>/best/``) or a workdir
of several runs laid out as a :class:`RunLayout` says (by default :data:`SEEDS_LAYOUT`,
``DIR/seed_<s>/``, the layout ``experiments/seeds.py`` writes). A run counts once it has its
``results.json`` (:data:`RESULTS`, written last by the pipeline).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

from ptq_adversary import io

__all__ = ["MODES", "RESULTS", "RunLayout", "SEEDS_LAYOUT", "find_runs", "run_modes"]

#: The pair modes a report looks for, in the order it shows them.
MODES = ("robust", "detrimental")

#: The file a finished pipeline run has (the pipeline writes it last).
RESULTS = "results.json"


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Where a workdir of several pipeline runs keeps them: ``WORKDIR/<name with the key>/``.

    Attributes:
      name: the directory name of run ``key`` as a template with one ``{}`` for the key,
        e.g. ``"seed_{}"`` (``WORKDIR/seed_0``, ``WORKDIR/seed_1``, ...) or ``"lr_{}"``.
        :func:`find_runs` globs it with ``*`` for ``{}`` and sorts the runs by the number the
        directory name ends with.

    Raises:
      ValueError: ``name`` does not hold exactly one ``{}`` (and no other brace) or holds a
        path separator.
    """

    name: str = "seed_{}"

    def __post_init__(self) -> None:
        rest = self.name.replace("{}", "", 1)
        if "{}" not in self.name or "{" in rest or "}" in rest or os.sep in self.name:
            raise ValueError(
                f"run layout {self.name!r}: need one directory name with exactly one '{{}}' "
                "for the run's key, e.g. 'seed_{}'"
            )

    @property
    def pattern(self) -> str:
        """The glob of the run directories, relative to the workdir (``seed_*``)."""
        return self.name.replace("{}", "*")

    def run_name(self, key: object) -> str:
        """The directory name of run ``key`` (``seed_3`` for key 3)."""
        return self.name.format(key)

    def run_dir(self, workdir: str, key: object) -> str:
        """The pipeline workdir of run ``key`` in ``workdir``."""
        return os.path.join(workdir, self.run_name(key))


#: The default layout, ``WORKDIR/seed_<s>/``: the one ``experiments/seeds.py`` writes.
SEEDS_LAYOUT = RunLayout("seed_{}")


def find_runs(workdir: str, layout: RunLayout = SEEDS_LAYOUT) -> dict[str, str]:
    """The pipeline workdirs in ``workdir``: its ``layout`` sub-directories, else itself.

    Args:
      workdir: a workdir of several runs (``workdir/seed_*/`` by default) or one pipeline
        workdir.
      layout: how the runs are named (default :data:`SEEDS_LAYOUT`, ``seed_<s>``).

    Returns:
      run name (``seed_0``, ... in numeric order, or the directory's base name) -> path, for
      the runs with a ``results.json``.

    Raises:
      FileNotFoundError: no finished run.
    """
    workdir = os.path.abspath(workdir)
    seeds = [
        d
        for d in glob.glob(os.path.join(workdir, layout.pattern))
        if os.path.exists(os.path.join(d, RESULTS))
    ]
    if seeds:
        key = lambda d: (int(m.group(1)) if (m := re.search(r"(\d+)$", d)) else 1 << 30, d)
        return {os.path.basename(d): d for d in sorted(seeds, key=key)}
    if os.path.exists(os.path.join(workdir, RESULTS)):
        return {os.path.basename(workdir.rstrip("/")) or "run": workdir}
    raise FileNotFoundError(
        f"no finished pipeline run in {workdir}: need {workdir}/{RESULTS} or "
        f"{workdir}/{layout.pattern}/{RESULTS}"
    )


def run_modes(run_dir: str) -> list[str]:
    """The pair modes (of :data:`MODES`, in that order) the run's ``results.json`` reports."""
    results = io.read_json(os.path.join(run_dir, RESULTS))
    return [m for m in MODES if m in results.get("pairs", {})]
