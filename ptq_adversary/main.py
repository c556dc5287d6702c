r"""Command-line entry point: parse flags, validate the config, dispatch to a trainer.

  python -m ptq_adversary.main --config=configs/fmnist_cnn.py[:arg] --workdir=DIR \
      [--config.optim.learning_rate=1e-3] [--verbose]

Config errors and unavailable data stop the run with a one-line message and exit status 2
(no traceback unless ``--verbose``); a config error leaves the workdir untouched.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from ptq_adversary import config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':arg'.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks and debug logging.")


def _trainers() -> dict[str, Callable[[Any, str], Any]]:
    # Imported lazily so that `--help` and config errors do not pay for JAX start-up.
    from ptq_adversary.trainers import distill, pipeline, policy_aware, supervised

    return {
        "supervised": supervised.train_and_evaluate,
        "distill": distill.train_and_evaluate,
        "policy_aware": policy_aware.train_and_evaluate,
        "pipeline": pipeline.run_pipeline,
    }


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {list(argv[1:])}; use --config and --workdir")
    logging.basicConfig(
        level=logging.DEBUG if _VERBOSE.value else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("absl", "jax", "orbax", "etils", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if _WORKDIR.value is None:
        _fail("--workdir is required")

    import jax

    from ptq_adversary import data

    try:
        config = _CONFIG.value
        # config_flags defers a file that failed to load to an error object; report it here.
        if (load_error := getattr(config, "_error", None)) is not None:
            _fail(_one_line(load_error))
        config_lib.validate(config, num_devices=jax.device_count())
        trainer = _trainers()[config.trainer]
        trainer(config, os.path.abspath(_WORKDIR.value))
    except (config_lib.ConfigError, data.DatasetUnavailableError) as err:
        if _VERBOSE.value:
            raise
        _fail(str(err).splitlines()[0] if isinstance(err, config_lib.ConfigError) else str(err))


def _one_line(err: BaseException) -> str:
    """The informative line of an error: a config file's traceback is cut to its last line."""
    text = str(err).replace("\\n", "\n").replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError's repr quotes
        text = text[1:-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        prefix = lines[0].split(":")[0]  # "flag --config=..."
        last = lines[-1]
        if ": " in last and "." in last.split(": ", 1)[0]:  # "pkg.mod.ErrorType: message"
            last = last.split(": ", 1)[1]
        return f"{prefix}: {last}"
    return " ".join(lines)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with bad flags and config overrides reported in one line."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        if "--verbose" in argv:
            raise
        text = _one_line(err)
        if isinstance(err, KeyError | AttributeError) and " " not in text:
            text = f"no config field {text.strip(chr(39))!r} (misspelt --config override?)"
        _fail(f"{text} (see --helpshort)")
        raise  # unreachable: _fail exits


def run() -> None:
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
