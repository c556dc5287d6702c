r"""The command line: parse flags, validate the config, dispatch to a trainer.

Run through its entry point, :mod:`ptq_adversary.main`::

  python -m ptq_adversary.main --config=configs/fmnist_cnn.py[:arg] --workdir=DIR \
      [--config.optim.learning_rate=1e-3] [--verbose] [--multihost]

Bad input stops the run with a one-line ``error: ...`` on stderr naming the field and what is
allowed, and no traceback unless ``--verbose``:

* exit status 2: a bad config value or argument, an unwritable workdir, a workdir holding
  another config's run or a damaged checkpoint, an unavailable dataset, non-finite input
  images, a missing input of an earlier stage. A config error leaves the workdir untouched.
* exit status 1: training diverged (a NaN/inf loss or state); the message names the step and
  the last good checkpoint, which a rerun resumes from.

Config files are Python and are executed: treat them as trusted input, like the code itself.

Multi-host (GPU clusters, TPU pod slices): ``--multihost`` calls ``jax.distributed.initialize``
before anything touches a device. On Cloud TPU, Slurm, Open MPI and Kubernetes JAX detects the
cluster itself; elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; a set ``JAX_COORDINATOR_ADDRESS`` implies ``--multihost``). Run the same
command on every host with the same shared ``--workdir``. Each process reads only its own rows
of every batch.

A run that seems stuck: ``kill -USR1 <pid>`` prints every thread's Python stack to stderr and
the run goes on (``faulthandler``), which shows the phase it waits in.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags
from ml_collections import config_flags

from ptq_adversary import checkpoint, data, metrics, training
from ptq_adversary import config as config_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, optionally with ':arg'.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks and debug logging.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    False,
    "Call jax.distributed.initialize() first (multi-host GPU or TPU pod slice). Implied by "
    "a set JAX_COORDINATOR_ADDRESS.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (default $JAX_NUM_PROCESSES or auto-detected)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default $JAX_PROCESS_ID or auto-detected)."
)

#: Exit status for bad input (config, workdir, data, checkpoints) and for a diverged run.
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 1


def _fail(message: str, status: int = EXIT_BAD_INPUT) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(status)


def check_workdir(workdir: str) -> None:
    """Raises :class:`config_lib.ConfigError` if ``workdir`` cannot be created or written.

    Creates nothing: the nearest existing ancestor must be a writable directory.
    """
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise config_lib.ConfigError(
            f"--workdir: {path} cannot be created: {probe} is a file, not a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise config_lib.ConfigError(
            f"--workdir: {path} is not writable ({probe} denies writing); choose another"
        )


#: Errors reported as bad input (:data:`EXIT_BAD_INPUT`).
BAD_INPUT_ERRORS: tuple[type[BaseException], ...] = (
    config_lib.ConfigError,
    checkpoint.CheckpointError,
    data.DatasetUnavailableError,
    data.IdxFormatError,
    data.NonFiniteInputError,
    FileNotFoundError,  # an earlier stage's output (teacher model, student dir) is missing
)


def execute(config: Any, workdir: str, *, verbose: bool = False) -> Any:
    """Validates ``config`` and runs its trainer in ``workdir``: what the command line does.

    Known bad input is reported as one ``error:`` line on stderr and ``SystemExit``
    (:data:`EXIT_BAD_INPUT`, or :data:`EXIT_DIVERGED` for a diverged run); ``verbose`` re-raises
    the original exception instead.

    Returns:
      The trainer's results dict.
    """
    try:
        config_lib.validate(config, num_devices=jax.device_count())
        check_workdir(workdir)
        return training.TRAINERS[config.trainer](config, os.path.abspath(workdir))
    except BAD_INPUT_ERRORS as err:
        if verbose:
            raise
        text = str(err)
        if isinstance(err, config_lib.ConfigError | FileNotFoundError):
            text = text.splitlines()[0] if text else type(err).__name__
        _fail(text)
    except metrics.NonFiniteError as err:
        if verbose:
            raise
        _fail(str(err), EXIT_DIVERGED)


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from the flags and environment, if asked for."""
    env = os.environ
    address = _COORDINATOR.value or env.get("JAX_COORDINATOR_ADDRESS")
    if not (_MULTIHOST.value or address):
        return

    def env_int(name: str) -> int | None:
        value = env.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            _fail(f"${name}: must be an int, got {value!r}")

    num_processes = _NUM_PROCESSES.value
    if num_processes is None:
        num_processes = env_int("JAX_NUM_PROCESSES")
    process_id = _PROCESS_ID.value
    if process_id is None:
        process_id = env_int("JAX_PROCESS_ID")
    try:
        jax.distributed.initialize(
            coordinator_address=address, num_processes=num_processes, process_id=process_id
        )
    except (ValueError, TypeError, RuntimeError) as err:
        if _VERBOSE.value:
            raise
        _fail(
            f"--multihost: jax.distributed.initialize failed ({err}); outside Cloud TPU, Slurm, "
            "Open MPI and Kubernetes pass --coordinator_address, --num_processes and "
            "--process_id"
        )
    logging.getLogger(__name__).info(
        "process %d of %d, %d of %d devices local",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )  # fmt: skip


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
    config = _CONFIG.value
    # config_flags defers a file that failed to load to an error object; report it here.
    if (load_error := getattr(config, "_error", None)) is not None:
        if _VERBOSE.value:
            raise load_error
        _fail(_one_line(load_error))
    initialize_distributed()  # before anything touches a device
    execute(config, _WORKDIR.value, verbose=_VERBOSE.value)


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
    """The command line: ``kill -USR1`` dumps stacks (``faulthandler``), then absl runs
    :func:`main` on the parsed flags."""
    if hasattr(signal, "SIGUSR1"):  # not on Windows
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=_parse_flags)
