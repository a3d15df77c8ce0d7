"""[10] The ``attncc`` command line: a click group with one module per command.

Every user mistake (an ``AttnccError``, a click usage error, a file that cannot be read or
written) is printed as ONE line ``error: ...`` on stderr with a non-zero exit status and no
traceback; that happens in one place, ``_Cli.main``, not in each command. Bugs in attncc itself
still raise with their traceback.
"""

from __future__ import annotations

import sys

import click

from attncc.errors import AttnccError

__all__ = ["cli", "main"]


class _Cli(click.Group):
    """The group, with user mistakes turned into one line on stderr.

    With ``standalone_mode=False`` (embedding) errors propagate as exceptions, as in click.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as done:
            sys.exit(done.exit_code)
        except click.exceptions.Abort:
            _fail("aborted", 1)
        except click.ClickException as err:
            _fail(err.format_message(), err.exit_code)
        except AttnccError as err:
            _fail(str(err), 1)
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            _fail(f"{where}{err.strerror or err}", 1)
        if isinstance(result, int) and not isinstance(result, bool):
            sys.exit(result)
        sys.exit(0)


def _fail(message: str, code: int) -> None:
    line = " ".join(str(message).split())
    click.echo(f"error: {line}", err=True)
    sys.exit(code or 1)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attncc", prog_name="attncc")
def cli() -> None:
    """attncc: compile attention variants written as spec files into fast kernels."""


def _register() -> None:
    from attncc.cli.backends import backends
    from attncc.cli.bench import bench
    from attncc.cli.check import check
    from attncc.cli.compile import compile_command
    from attncc.cli.db import db
    from attncc.cli.run import run
    from attncc.cli.show import show
    from attncc.cli.target import target
    from attncc.cli.tune import tune
    from attncc.cli.viz import viz

    for command in (show, check, compile_command, run, bench, tune, viz, db, backends, target):
        cli.add_command(command)


_register()


def main(args=None) -> None:
    """The console script ``attncc``: run the group, exit with its status."""
    cli.main(args=args, prog_name="attncc")
