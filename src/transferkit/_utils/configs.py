"""The one walker over saved configs: nested dicts and lists, as `json.loads` returns them.

Keras configs (a model's `get_config()`, the `model_config` of an `.h5`, the `config.json` of a
`.keras` archive) are trees of dicts and lists. Every pass transferkit makes over one is either
a search (`nodes`: every node, top down) or a rewrite (`map_config`: a copy, rebuilt bottom up),
so that the recursion is written once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["map_config", "nodes"]


def nodes(config: Any) -> Iterator[Any]:
    """Every node of `config`, itself first, then its children (depth first, in order).

    Dicts and lists (and tuples) are walked into; anything else is a leaf, yielded too. The
    tree may be changed below a node once that node was yielded only if its children are not
    replaced: the walk reads each container's children when it reaches it.

    Args:
        config: a config tree.

    Yields:
        Each node, containers before what they contain.

    Example:

    ```python
    names = [n["class_name"] for n in nodes(config) if isinstance(n, dict) and "class_name" in n]
    ```
    """
    stack = [config]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, dict):
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed(node))


def map_config(config: Any, change: Callable[[Any], Any]) -> Any:
    """A copy of `config` with `change` applied to every node, bottom up.

    A container is rebuilt from its changed children first, then passed to `change`, so what
    `change` returns is never walked again (it may hold nodes `change` would rewrite). Tuples
    become lists, as in JSON. The input is not modified, provided `change` does not modify
    what it is given.

    Args:
        config: a config tree.
        change: called with every node (leaves included), returns its replacement (the node
            itself to keep it).

    Returns:
        The rewritten tree.

    Example:

    ```python
    no_modules = map_config(
        config,
        lambda n: {k: v for k, v in n.items() if k != "module"} if isinstance(n, dict) else n,
    )
    ```
    """
    if isinstance(config, dict):
        config = {key: map_config(value, change) for key, value in config.items()}
    elif isinstance(config, (list, tuple)):
        config = [map_config(item, change) for item in config]
    return change(config)
