"""print_config=true: the composed config as a tree at start (rich when installed, else YAML)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

#: top-level groups first, in this order; the other keys after them
ORDER = ("data", "backbone", "method", "trainer", "callbacks", "logger", "schedule", "paths")


def print_config_tree(cfg: DictConfig, resolve: bool = True, file=None) -> None:
    file = file or sys.stdout
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER and k != "hydra"]
    try:
        import rich.console
        import rich.syntax
        import rich.tree
    except ImportError:  # plain YAML, same content
        print(OmegaConf.to_yaml(OmegaConf.masked_copy(cfg, keys), resolve=resolve), file=file)
        return
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    rest = {}
    for key in keys:
        node = cfg[key]
        if OmegaConf.is_config(node):
            text = OmegaConf.to_yaml(node, resolve=resolve)
            tree.add(key, style="bold").add(rich.syntax.Syntax(text, "yaml"))
        else:
            rest[key] = node
    if rest:
        tree.add("(top level)", style="bold").add(rich.syntax.Syntax(OmegaConf.to_yaml(OmegaConf.create(rest)), "yaml"))
    rich.console.Console(file=file).print(tree)
