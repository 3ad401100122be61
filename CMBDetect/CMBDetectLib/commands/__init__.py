"""Sub-commands of ``cmbdetect``: each module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. ``cli.py`` discovers them, so adding a command never touches another file."""
