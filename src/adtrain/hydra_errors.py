"""Hydra's refusals of a command line, said as adtrain's own: one line naming the key, exit status 2.

Hydra prints a config it cannot compose (a misspelt key, an unknown option of a group, an override
it cannot parse) over several lines with a note about HYDRA_FULL_ERROR, and exits with status 1;
every other refusal of adtrain is `adtrain: error: config key '...': ...` with status 2 (a script
or a scheduler tells a refused command from a crash by it). HYDRA_FULL_ERROR=1 keeps Hydra's own.
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from adtrain.errors import ConfigError


def composition_error(ex: Exception) -> ConfigError | None:
    """The one-line ConfigError for a Hydra composition or override error; None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    text = str(ex)
    if isinstance(ex, MissingConfigException):  # method=nosuch (its options listed), or a missing primary config
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        options = [o for o in (getattr(ex, "options", None) or []) if not o.startswith("_")]
        if found is None:
            return ConfigError("config", " ".join(text.split()))
        group, name = found.groups()
        close = difflib.get_close_matches(name, options, n=1)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return ConfigError(group, f"has no option '{name}'{hint} (its options: {', '.join(options)})")
    if isinstance(ex, OverrideParseException):  # method.coreset_ratio=[0.1
        override = str(getattr(ex, "override", "") or "")
        key = override.split("=", 1)[0].lstrip("+~") or "overrides"
        first = text.splitlines()[0] if text else "cannot be parsed"
        return ConfigError(key, f"the override {override!r} cannot be parsed: {first} (a list is [a,b]; "
                                "quote a value holding spaces or brackets)")
    if isinstance(ex, ConfigCompositionException):
        found = re.search(r"Could not override '([^']+)'", text)
        if found is not None and _not_in_struct(ex.__cause__):
            key = found.group(1)
            return ConfigError(key, "is not in the config" + _did_you_mean(key, ex.__cause__)
                               + f" (+{key}=... adds a new key; python -m adtrain ... --cfg job shows them all)")
        found = re.search(r"'([^'\s]+)'", text)  # a key or an override (not "Hydra's configuration ... '")
        key = found.group(1).split("=", 1)[0].lstrip("+~") if found else "overrides"
        hint = ""
        if key.startswith("hydra.sweeper.params."):  # the packaged search space's own path
            entry = key.removeprefix("hydra.sweeper.params.")
            hint = f"; a search-space entry is changed by naming its key: '{entry}=choice(...)' or '{entry}=interval(...)'"
        return ConfigError(key, " ".join(text.split()) + hint)
    return None


def _not_in_struct(cause) -> bool:
    return cause is not None and "not in struct" in str(cause)


def _did_you_mean(key: str, cause) -> str:
    """'; did you mean method.coreset_ratio?' from the keys beside the misspelt part (methd.x: method.x)."""
    parent = getattr(cause, "parent_node", None)
    try:
        keys = [str(k) for k in parent.keys()] if parent is not None else []
    except Exception:  # noqa: BLE001 - a hint only
        keys = []
    parts = key.split(".")
    missing = str(getattr(cause, "key", None) or parts[-1])
    at = len(parts) - 1 - parts[::-1].index(missing) if missing in parts else len(parts) - 1
    close = difflib.get_close_matches(parts[at], keys, n=1)
    return f"; did you mean {'.'.join([*parts[:at], close[0], *parts[at + 1:]])}?" if close else ""


def one_line_composition_errors() -> None:
    """Hydra's run_and_report (which prints and exits 1) given a guard that says composition errors in
    one line and exits 2; Hydra's own printing where HYDRA_FULL_ERROR is set or the guard cannot be put."""
    try:
        import hydra._internal.utils as hydra_utils
    except ImportError:  # another Hydra: its own messages
        return
    original = getattr(hydra_utils, "run_and_report", None)
    if original is None or getattr(original, "adtrain_guard", False) or os.environ.get("HYDRA_FULL_ERROR"):
        return

    def run_and_report(func):
        def guarded():
            try:
                return func()
            except Exception as ex:  # noqa: BLE001 - only Hydra's composition errors are said here
                err = composition_error(ex)
                if err is None:
                    from adtrain.sweep import end_broken_sweep

                    if end_broken_sweep(ex):  # a sweeper's or launcher's own failure: the summary, one line
                        sys.exit(1)
                    raise
                print(f"adtrain: error: {err}", file=sys.stderr)
                sys.exit(2)

        return original(guarded)

    run_and_report.adtrain_guard = True
    hydra_utils.run_and_report = run_and_report
