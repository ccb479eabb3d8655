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


def options(argv: Sequence[str], defaults: dict, text: Sequence[str] = ()) -> dict:
    """key=value arguments over ``defaults`` (a key not among them refused, naming it). The ``text`` keys
    (paths, file patterns) keep what was typed: a folder named 2024 or 007, a lot named on, a file name
    holding ${...} (YAML read them as 2024, 7, True and an interpolation); the others are YAML scalars
    (batch_size=8, heatmaps=false). An empty value is None."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from adtrain.errors import ConfigError

    args = dict(defaults)
    for arg in argv:
        key, eq, value = arg.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(key or arg, f"unknown option; known: {', '.join(defaults)}")
        if not eq:
            raise ConfigError(key, f"give it a value: {key}=...")
        if key in text or value == "":
            args[key] = value if value != "" else None
            continue
        try:
            args[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]), resolve=True)[key]
        except (OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
            first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            raise ConfigError(key, f"cannot read {value!r} ({first}); quote it if it is text") from None
    return args

