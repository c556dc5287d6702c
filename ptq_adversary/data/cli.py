"""The command line ``python -m ptq_adversary.data``: ``--info NAME`` or ``--prepare NAME``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from ptq_adversary.data.containers import Dataset, DatasetUnavailableError
from ptq_adversary.data.idx import IdxFormatError
from ptq_adversary.data.registry import DATASETS, load_dataset, prepare

__all__ = ["main"]

#: ``--help``'s description: the first line of the package's docstring.
DESCRIPTION = "Datasets as in-memory numpy arrays, offline first, with step-indexed batching."


def _print_info(ds: Dataset) -> None:
    print(f"dataset      {ds.name}")
    print(f"train        {len(ds.train)}")
    print(f"val          {len(ds.val)}")
    print(f"test         {len(ds.test)}")
    print(f"image_shape  {ds.image_shape}")
    print(f"num_classes  {ds.num_classes}")
    print(f"class_names  {', '.join(ds.class_names)}")
    print(f"mean         {np.array2string(ds.mean, precision=4)}")
    print(f"std          {np.array2string(ds.std, precision=4)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--prepare NAME`` or ``--info NAME``, with ``--data_dir DIR``."""
    parser = argparse.ArgumentParser(prog="python -m ptq_adversary.data", description=DESCRIPTION)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prepare", metavar="NAME", choices=sorted(DATASETS))
    group.add_argument("--info", metavar="NAME", choices=sorted(DATASETS))
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--val_size", type=int, default=5000)
    parser.add_argument("--split_seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.prepare:
            prepare(args.prepare, args.data_dir)
            print(f"{args.prepare} is ready in {args.data_dir or 'the default location'}.")
        else:
            _print_info(
                load_dataset(
                    args.info,
                    data_dir=args.data_dir,
                    val_size=args.val_size,
                    split_seed=args.split_seed,
                )
            )
    except (DatasetUnavailableError, IdxFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
