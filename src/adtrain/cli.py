"""What the small commands share (adtrain-predict, adtrain-export, adtrain-templates, adtrain-bench):
``-h`` / ``--help`` prints the command's usage (its module's docstring), and an adtrain error ends
the command in one line on stderr with exit status 2, never a traceback. (`python -m adtrain`
is Hydra's: ``--help`` there is Hydra's.)"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

from adtrain.errors import AdtrainError, Terminated

HELP = ("-h", "--help", "help")


def command(name: str, usage: str, body: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> Any:
    """body(argv) with the shared handling: the usage for a help flag (None returned), one line for
    an AdtrainError, and for SIGTERM (adtrain-bench's run) with status 143, never a silent 0."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in HELP for a in args):
        print(usage.strip())
        return None
    try:
        return body(args)
    except AdtrainError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except Terminated as err:
        print(f"{name}: interrupted: {err}", file=sys.stderr)
        sys.exit(143)  # 128 + SIGTERM, as a shell reports it
