"""The `shipyard` group: how every command ends (exit code and one line), and the signals that end it.

Exit codes, one meaning each (EXIT_CODES, printed by --help):
  0    every gate passed
  1    a gate failed; artifacts, manifest and reports were still written
  2    bad input, usage or environment (a full disk, an unwritable or locked folder): one line
       naming the thing and the fix, without a traceback
  3    an internal error: one line saying so and where the full traceback was written
  130  interrupted (Ctrl-C or SIGTERM); partial outputs were removed
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import NoReturn

import click

from pipeline.errors import ShipyardError

PASSED, GATE_FAILED, BAD_INPUT, INTERNAL_ERROR, INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = ("Exit codes: 0 every gate passed; 1 a gate failed (artifacts, manifest and reports written); "
              "2 bad input, usage or environment (one line naming the thing and the fix); 3 internal error "
              "(the traceback is written to a log file the message names); 130 interrupted (partial outputs removed).")
# Environment failures a user fixes (space, permissions), not bugs: exit 2 with the path named.
USER_OS_ERRORS = {errno.ENOSPC: "free some space or choose another --out", errno.EDQUOT: "free some quota or choose "
                  "another --out", errno.EROFS: "choose a writable --out", errno.EACCES: "choose a writable --out"}
INTERRUPTED_MESSAGE = "interrupted; partial outputs were removed and nothing was recorded"


class ShipyardGroup(click.Group):
    """Maps every way a command can end to its exit code and a one-line message (module docstring)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ShipyardError as err:  # bad input, unless the error says otherwise (an engine build failed: 1)
            _fail(ctx, getattr(err, "exit_code", BAD_INPUT), str(err))
        except KeyboardInterrupt:
            _fail(ctx, INTERRUPTED, INTERRUPTED_MESSAGE)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except OSError as err:
            if _SIGNALLED:
                _fail(ctx, INTERRUPTED, INTERRUPTED_MESSAGE)
            if err.errno is None or err.errno not in USER_OS_ERRORS:
                _internal_error(ctx, err)
            _fail(ctx, BAD_INPUT, os_error_message(err))
        except Exception as err:  # a bug, or a library failing in a way we did not foresee
            if _SIGNALLED:  # unless a signal interrupted a library mid-way (module docstring)
                _fail(ctx, INTERRUPTED, INTERRUPTED_MESSAGE)
            _internal_error(ctx, err)


def os_error_message(err: OSError) -> str:
    """The one line for an environment error a user fixes: a file this user may not read is named
    as an input (a model's weights, a data file), anything else as an output."""
    reason = err.strerror or os.strerror(err.errno or 0)
    name = err.filename
    if err.errno == errno.EACCES and name and os.path.exists(name) and not os.access(name, os.R_OK):
        return f"{reason} reading {name}; make it readable by this user (chmod, or run as its owner)"
    where = f" writing {name}" if name else ""
    return f"{reason}{where}; {USER_OS_ERRORS[err.errno or 0]} (partial outputs were removed)"


def _fail(ctx: click.Context, code: int, message: str) -> NoReturn:
    click.echo(f"error: {' '.join(message.split())}", err=True)
    ctx.exit(code)


def _internal_error(ctx: click.Context, err: Exception) -> NoReturn:
    from pipeline.run.cache import write_crash_log

    log = write_crash_log(err, sys.argv)
    first = (str(err).strip().splitlines() or [""])[0][:200]
    _fail(ctx, INTERNAL_ERROR, f"internal error ({type(err).__name__}: {first}); this is a Shipyard bug or a "
          f"broken installation, not a gate result; full traceback in {log}")


class ShipyardCommand(click.Command):
    """Every command's --help ends with the exit codes."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("epilog", EXIT_CODES)
        super().__init__(*args, **kwargs)


ShipyardGroup.command_class = ShipyardCommand
ShipyardGroup.group_class = type  # subgroups are ShipyardGroups too


@click.group(cls=ShipyardGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES)
@click.version_option(package_name="bert-shipyard")
def cli() -> None:
    """Export, quantize and parity-gate fine-tuned BERT models into release artifacts."""


_SIGNALLED: list[int] = []  # signals received: an error raised while unwinding from one is the interrupt


def _interrupt(signum, frame) -> None:
    # A cancelled CI job sends SIGTERM: unwind like Ctrl-C, so temporary outputs are removed.
    # Raised inside a C extension's import (onnxruntime, torch) the KeyboardInterrupt comes out as
    # an ImportError; `_SIGNALLED` lets ShipyardGroup report it as the interrupt it is (exit 130).
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    cli(prog_name="shipyard")

