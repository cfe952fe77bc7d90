"""The `vitspec` command.

Subcommands live in their own modules and are imported only when run, so `vitspec --help`
imports neither a framework nor pydantic. Bad input ends with one line per problem on stderr and
exit status 1; anything else that goes wrong is reported as an internal error with exit status 2;
never a traceback (set VITSPEC_DEBUG=1 to see one).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import click

# name: (module, function, one-line help). The help is here so that listing costs no import.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "build": (
        "vitspec.cli.build",
        "build",
        "Build a spec natively in a framework, run it once and summarise it.",
    ),
    "convert": (
        "vitspec.cli.convert",
        "convert",
        "Convert weights between frameworks and checkpoint layouts.",
    ),
    "inspect": (
        "vitspec.cli.spec_commands",
        "inspect",
        "Show the spec and tensor table of a weights file.",
    ),
    "conformance": (
        "vitspec.cli.conformance",
        "conformance",
        "Run the conformance suite against backends.",
    ),
    "diff": ("vitspec.cli.conformance", "diff", "Layer-by-layer divergence between two backends."),
    "validate": (
        "vitspec.cli.spec_commands",
        "validate",
        "Check spec files; print each problem found.",
    ),
    "layout": (
        "vitspec.cli.spec_commands",
        "layout",
        "Print the canonical parameter table of a spec.",
    ),
    "presets": (
        "vitspec.cli.spec_commands",
        "presets",
        "List the named presets (B/16, L/14, ...).",
    ),
    "schema": (
        "vitspec.cli.spec_commands",
        "schema",
        "Print the spec's JSON Schema (for editors).",
    ),
    "backends": (
        "vitspec.cli.backends",
        "backends",
        "List registered backends, their versions and status.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                return _unavailable(cmd_name)
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _unavailable(name: str) -> click.Command:
    @click.command(name=name, help=COMMANDS[name][2])
    def stub() -> None:
        raise click.ClickException(f"`vitspec {name}` is not available in this installation")

    return stub


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vitspec", prog_name="vitspec")
def cli() -> None:
    """One Vision Transformer spec, built natively in PyTorch, TensorFlow and JAX/Flax.

    SPEC arguments take a YAML/JSON file or a preset name such as B/16.
    """


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI, turning errors into one-line messages and an exit status.

    0 success; 1 bad input (a VitspecError, one ``error:`` line per problem) or an operating-system
    refusal (a full disk, a permission); 2 a command-line usage error (click's) or an internal
    error (a bug in vitspec, never the user's fault); 130 interrupted.
    """
    from vitspec import files

    # Notes from the library (a stale partial output removed) go to stderr, one line each.
    previous = files.set_notifier(lambda note: click.secho(f"note: {note}", err=True, fg="yellow"))
    try:
        return cli.main(args=argv, prog_name="vitspec", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        # click turns Ctrl-C into Abort; outputs are written atomically, so nothing is half-written.
        click.echo("interrupted; no output was left half-written", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        if os.environ.get("VITSPEC_DEBUG"):
            raise
        sys.exit(_report(exc))
    finally:
        files.set_notifier(previous)


# A framework a command needs but this installation lacks, and the extra that installs it.
_EXTRAS = {
    "torch": "torch",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
    "h5py": "tensorflow",
    "jax": "jax",
    "jaxlib": "jax",
    "flax": "jax",
}


def _report(exc: Exception) -> int:
    """Print ``exc`` for the user; return the exit status it means."""
    from vitspec.errors import VitspecError

    missing = (exc.name or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if missing in _EXTRAS:
        click.secho(
            f"error: this needs {missing}, which is not installed here "
            f"(pip install 'vitspec[{_EXTRAS[missing]}]')",
            err=True,
            fg="red",
        )
        return 1
    if isinstance(exc, VitspecError | OSError):
        for line in (str(exc) or type(exc).__name__).splitlines():
            click.secho(f"error: {line}", err=True, fg="red")
        return 1
    message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    click.secho(
        f"internal error: {type(exc).__name__}: {message} — this is a bug in vitspec; "
        "rerun with VITSPEC_DEBUG=1 for the traceback",
        err=True,
        fg="red",
    )
    return 2


if __name__ == "__main__":
    main()
