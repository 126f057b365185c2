"""The private helpers every layer shares: the config walker, the argument checks and the batch
iterator."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from transferkit._utils.batches import iter_batches
from transferkit._utils.checks import (
    check_fraction,
    check_int,
    check_optional_int,
    check_positive_number,
    is_int,
)
from transferkit._utils.configs import map_config, nodes
from transferkit.errors import ConfigError

CONFIG: dict[str, Any] = {
    "class_name": "Functional",
    "config": {
        "layers": [
            {"class_name": "InputLayer", "name": "in", "inbound_nodes": []},
            {"class_name": "Dense", "name": "d", "inbound_nodes": [[["in", 0, 0, {}]]]},
        ],
        "output_layers": [("d", 0, 0)],
    },
}


def test_nodes_yields_every_node_parents_first_in_order() -> None:
    found = list(nodes(CONFIG))
    assert found[0] is CONFIG
    classes = [n["class_name"] for n in found if isinstance(n, dict) and "class_name" in n]
    assert classes == ["Functional", "InputLayer", "Dense"]
    # Leaves are yielded too, tuples are walked into.
    assert "in" in found and ("d", 0, 0) in found and "d" in found
    dense = CONFIG["config"]["layers"][1]
    ids = [id(n) for n in found]
    assert ids.index(id(dense)) < ids.index(id(dense["inbound_nodes"][0][0]))


def test_map_config_rewrites_bottom_up_without_touching_the_input() -> None:
    before = copy.deepcopy(CONFIG)
    seen: list[Any] = []

    def change(node: Any) -> Any:
        seen.append(node)
        if isinstance(node, list) and len(node) >= 3 and node[0] == "in":
            # What this returns holds the reference again: it must not be rewritten twice.
            return {"ref": [node[0], 9, node[2]]}
        if isinstance(node, dict):
            return {k: v for k, v in node.items() if k != "name"}
        return node

    out = map_config(CONFIG, change)
    assert before == CONFIG
    dense = out["config"]["layers"][1]
    assert dense == {"class_name": "Dense", "inbound_nodes": [[{"ref": ["in", 9, 0]}]]}
    assert out["config"]["output_layers"] == [["d", 0, 0]]  # a tuple becomes a list, as JSON
    assert seen[-1] == out  # the root last: children are changed before their parent


def test_is_int_and_check_int_refuse_bools_and_accept_numpy_integers() -> None:
    assert is_int(3) and is_int(np.int64(3), minimum=3) and not is_int(True)
    assert not is_int(2.0) and not is_int(2, minimum=3)
    value = check_int(np.int32(4), "epochs", minimum=1)
    assert value == 4 and type(value) is int
    for bad in (0, True, 1.5, "2", None):
        with pytest.raises(ConfigError, match=r"^epochs must be an int >= 1, got "):
            check_int(bad, "epochs", minimum=1)
    assert check_optional_int(None, "steps", minimum=1) is None
    assert check_optional_int(2, "steps", minimum=1) == 2
    with pytest.raises(ConfigError, match=r"steps must be None or an int >= 1, got 0\."):
        check_optional_int(0, "steps", minimum=1)


@pytest.mark.parametrize("bad", [1, 1.0, -0.1, float("nan"), True, "0.5"])
def test_check_fraction_takes_numbers_in_zero_one(bad: object) -> None:
    assert check_fraction(0, "momentum") == 0.0 and check_fraction(0.9, "momentum") == 0.9
    with pytest.raises(ConfigError, match=r"momentum must be a number in \[0, 1\), got "):
        check_fraction(bad, "momentum")


def test_check_positive_number() -> None:
    assert check_positive_number(2, "lr") == 2.0
    for bad in (0, -1.0, float("inf"), True, None):
        with pytest.raises(ConfigError, match=r"lr must be a finite number > 0"):
            check_positive_number(bad, "lr")


def test_iter_batches_slices_arrays_and_structures_leaf_by_leaf() -> None:
    x = np.arange(10).reshape(5, 2)
    got = list(iter_batches(x, 2))
    assert [b.tolist() for b in got] == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9]]]
    assert np.shares_memory(got[0], x)  # consecutive slices are views
    data = {"a": x, "b": (np.arange(5), np.arange(5) * 10)}
    batches = list(iter_batches(data, 2, steps=2))
    assert len(batches) == 2 and batches[1]["b"][1].tolist() == [20, 30]
    assert batches[1]["a"].tolist() == [[4, 5], [6, 7]]
    # An order gathers those rows, a subset too.
    ordered = list(iter_batches((x, np.arange(5)), 2, order=np.array([4, 0, 2])))
    assert [b[1].tolist() for b in ordered] == [[4, 0], [2]]
    assert list(iter_batches(np.zeros((0, 3)), 4)) == []


def test_iter_batches_yields_the_elements_of_anything_else() -> None:
    elements = [np.ones(2), np.zeros(2), np.ones(3)]
    assert len(list(iter_batches(iter(elements), 99))) == 3
    assert len(list(iter_batches(iter(elements), 99, steps=2))) == 2
    consumed = iter(elements)
    assert len(list(iter_batches(consumed, 1, steps=1))) == 1
    assert len(list(consumed)) == 2  # stopping at `steps` pulls no element more
