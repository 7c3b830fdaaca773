"""The argument parser of every script: argparse's, whose errors are two lines, not a screen of usage.

argparse prints the whole usage (38 lines for evaluate.py) before ``prog: error: ...``, so the one line
that matters scrolls away. :class:`ArgumentParser` prints the short form ``usage: prog [-h] [options]``
and the error, and exits with status 2 as argparse does; ``--help`` is unchanged.
"""
from __future__ import annotations

import argparse
from typing import NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with a short error: ``usage: prog [-h] [options]`` and ``prog: error: ...``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"usage: {self.prog} [-h] [options]\n{self.prog}: error: {message}\n")


def make_parser(description: str, add_help: bool = True, defaults: bool = True) -> ArgumentParser:
    """The scripts' parser: :class:`ArgumentParser` with the defaults shown in ``--help`` (``defaults``)."""
    formatter = argparse.ArgumentDefaultsHelpFormatter if defaults else argparse.HelpFormatter
    return ArgumentParser(description=description, add_help=add_help, formatter_class=formatter)
