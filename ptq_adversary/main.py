"""``python -m ptq_adversary.main --config=... --workdir=...``: see :mod:`ptq_adversary.cli`."""

from absl import flags

from ptq_adversary import cli

if __name__ == "__main__":
    __doc__ = cli.__doc__  # absl's --help prints the main module's docstring and key flags
    flags.adopt_module_key_flags(cli)
    cli.run()
