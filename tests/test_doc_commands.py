"""Every `python -m adtrain ...` / `adtrain ...` / `adtrain.bench` command in README.md, docs/ and
benchmarks/README.md composes: a renamed or removed config key or option fails here, not in a
user's first run from the docs. Composition only (Hydra's struct config refuses unknown keys and
missing group options); placeholders (RUN_DIR, M, <...>, $VAR) skip a command, a sweep's first
value stands for its list, `hydra.*` and `bench.*` keys are left to their own checks. The small
commands (`adtrain.predict`, `adtrain.export`, `adtrain.templates add`, or their console scripts)
name only options they know."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from adtrain.api import compose

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
START = re.compile(r"(?:^|[\s`(;&|])(?:\S*python3? -m adtrain(?:\.bench)?|adtrain(?:-bench)?)(?=\s)")
PLACEHOLDER = re.compile(r"\b[A-Z]\b|[A-Z]{2,}|<|\$|\.\.\.|\[\w+=")


def _joined(doc: Path) -> str:
    """A doc's text with shell line continuations (backslash, newline, indent) joined."""
    return re.sub(r"\\\n\s*", " ", doc.read_text(encoding="utf-8"))


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file, overrides) of each distinct documented command."""
    found, seen = [], set()
    for doc in DOCS:
        text = _joined(doc)
        for line in text.splitlines():
            spans = re.findall(r"`([^`]+)`", line) if "`" in line else [line]
            for span in spans:
                start = START.search(" " + span)
                if not start:
                    continue
                rest = re.split(r"\s(?:&&|\|\|?|;|2>&1|>)\s?", (" " + span)[start.end():])[0]
                try:
                    words = shlex.split(rest)
                except ValueError:  # a quote that the span cut
                    continue
                overrides = [w for w in words if "=" in w and not w.startswith("-")]
                if not overrides or any(PLACEHOLDER.search(w) for w in overrides):
                    continue
                kept = []
                for w in overrides:
                    key, value = w.split("=", 1)
                    if key.lstrip("+~").startswith(("hydra.", "bench.")):
                        continue
                    if "," in value and not value.startswith(("[", "{", "'", '"')) and "(" not in value:
                        value = value.split(",")[0]  # a sweep: its first value
                    kept.append(f"{key}={value}")
                if kept and tuple(kept) not in seen:
                    seen.add(tuple(kept))
                    found.append((str(doc.relative_to(ROOT)), kept))
    return found


def test_every_documented_command_composes():
    commands = documented_commands()
    assert len(commands) > 50  # the extraction still finds the docs' commands
    failed = []
    for doc, overrides in commands:
        try:
            compose(overrides)
        except Exception as err:  # noqa: BLE001 - each failure is listed with its file
            failed.append(f"{doc}: {' '.join(overrides)}: {str(err).splitlines()[0][:240]}")
    assert failed == []


SMALL = re.compile(r"(?:-m adtrain\.|adtrain-)(predict|export|templates)(?:\s+add)?((?:\s+[\w.]+=\S+)+)")


def small_commands() -> list[tuple[str, str, list[str]]]:
    """(file, command, option keys) of each documented predict / export / templates command."""
    found = []
    for doc in DOCS:
        text = _joined(doc)
        for m in SMALL.finditer(text):
            keys = [w.split("=", 1)[0] for w in m.group(2).split()]
            found.append((str(doc.relative_to(ROOT)), m.group(1), keys))
    return found


def test_the_small_commands_in_the_docs_name_known_options():
    from adtrain import predict, templates
    from adtrain.export import DEFAULTS as export_options

    known = {"predict": set(predict.DEFAULTS), "export": set(export_options), "templates": set(templates.DEFAULTS)}
    found = small_commands()
    assert {cmd for _, cmd, _ in found} == set(known)  # each is documented with options
    unknown = [(doc, cmd, key) for doc, cmd, keys in found for key in keys if key not in known[cmd]]
    assert unknown == []


def test_a_stale_key_in_a_documented_command_is_caught(tmp_path, monkeypatch):
    doc = tmp_path / "README.md"
    doc.write_text("Run `python -m adtrain method=patchcore data.no_such_key=3` or\n"
                   "```bash\nadtrain method=stfpm \\\n    trainer.max_epochs=2\n```\n")
    monkeypatch.setitem(globals(), "DOCS", [doc])
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    commands = documented_commands()
    assert commands == [("README.md", ["method=patchcore", "data.no_such_key=3"]),
                        ("README.md", ["method=stfpm", "trainer.max_epochs=2"])]
    errors = []
    for _, overrides in commands:
        try:
            compose(overrides)
        except Exception as err:  # noqa: BLE001
            errors.append(str(err))
    assert len(errors) == 1 and "no_such_key" in errors[0]
    doc.write_text("`python -m adtrain.export checkpoint=RUN/m.ckpt fmt=onnx` and `adtrain-predict \\\n"
                   "  checkpoint=X images=Y`\n")
    assert small_commands() == [("README.md", "export", ["checkpoint", "fmt"]),
                                ("README.md", "predict", ["checkpoint", "images"])]
