"""Console scripts (pyproject [project.scripts]): each returns an exit status, never a result object."""

from __future__ import annotations


def bench() -> int:
    """adtrain-bench [overrides] [bench.out=FILE]: python -m adtrain.bench."""
    from adtrain.bench import main

    main()
    return 0
