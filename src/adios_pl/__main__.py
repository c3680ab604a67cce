"""``python -m adios_pl ...``: the ``adios-pl`` command, for when its script is not on ``PATH``."""

from adios_pl.console import console_main

console_main()
