"""The ``adios-pl`` console script.

The Lightning package is chosen when :mod:`adios_pl.backend` is first imported, from
``ADIOS_PL_LIGHTNING`` among other things; the command line imports it. A bad value there is an
error of the user's, so this entry point imports the backend first and reports a bad value as
every other user error of the command line: one line, exit code 2 (``ADIOS_PL_DEBUG=1`` for the
traceback).
"""

from __future__ import annotations

import os
import sys

from adios_pl.errors import LightningPackageError


def console_main() -> None:
    """Run ``adios-pl`` with the process's arguments, and exit with its code."""
    try:
        import adios_pl.backend  # noqa: F401  (chooses the Lightning package)
    except LightningPackageError as error:
        if os.environ.get("ADIOS_PL_DEBUG"):
            raise
        print(f"adios-pl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    from adios_pl.cli import main

    raise SystemExit(main())


if __name__ == "__main__":
    console_main()
