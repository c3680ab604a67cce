"""The ``adios-pl`` command line: LightningCLI for ``fit``/``validate``/..., plus ``demo``.

Every constructor argument of :class:`~adios_pl.ADIOSModule`, the objectives, the DataModules,
the callbacks and the Trainer is a flag or a YAML key (jsonargparse reads the signatures).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import difflib
import warnings
import re

from jsonargparse import ActionConfigFile
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from adios_pl.data.base import SSLDataModule
from adios_pl.module import ADIOSModule

#: Errors a user can cause (bad paths, bad values, wrong checkpoint); shown as one line.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, TypeError, MisconfigurationException, KeyError)


def _known_keys(parser: Any) -> list[str]:
    """Every option key of ``parser`` and of its subcommands' parsers."""
    keys: list[str] = []
    for action in getattr(parser, "_actions", []):
        if getattr(action, "dest", None) and action.dest not in ("help", "config"):
            keys.append(action.dest)
        for sub in getattr(action, "_name_parser_map", {}).values():
            keys += _known_keys(sub)
    return keys


class SuggestingParser(LightningArgumentParser):
    """A parser whose "unknown option" errors suggest the closest known key."""

    def error(self, message: str, *args: Any, **kwargs: Any) -> Any:
        """Add "did you mean ..." to errors about unknown keys."""
        match = re.search(r"option '([^']+)'|unrecognized arguments: --(\S+)|Key '([^']+)' is not expected", message)
        if match:
            wrong = next(g for g in match.groups() if g)
            close = difflib.get_close_matches(wrong, sorted(set(_known_keys(self))), n=1, cutoff=0.6)
            if close:
                message = f"{message} -- did you mean '{close[0]}'?"
        return super().error(message, *args, **kwargs)


class ADIOSCLI(LightningCLI):
    """LightningCLI for :class:`ADIOSModule` and any :class:`SSLDataModule` subclass.

    ``data.init_args.image_size`` is linked to ``model.image_size``, so the size is set once, in
    the data section.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Parsers that suggest the closest key for a misspelt one."""
        kwargs.setdefault("dump_header", ["adios-pl"])
        parser = SuggestingParser(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file in json or yaml format.")
        return parser

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Link the image size of the data to the model."""
        parser.link_arguments("data.init_args.image_size", "model.image_size")


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> ADIOSCLI:
    """Create the CLI (``args=None`` reads ``sys.argv``)."""
    # Passing args from main() is intended: the demo split happens before LightningCLI.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return ADIOSCLI(
        ADIOSModule,
        SSLDataModule,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "adios-pl"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adios-pl`` console script; returns the exit code.

    ``adios-pl demo [...]`` runs the demo; anything else goes to LightningCLI. Errors a user can
    cause are printed as one line (set ``ADIOS_PL_DEBUG=1`` for the traceback).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["demo"]:
            from adios_pl.demo import run_demo_cli

            return run_demo_cli(args[1:])
        build_cli(argv)
        return 0
    except USER_ERRORS as error:
        if os.environ.get("ADIOS_PL_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"adios-pl: error: {message}", file=sys.stderr)
        return 2


def console_main() -> None:
    """``adios-pl`` console script."""
    raise SystemExit(main())


if __name__ == "__main__":
    console_main()
