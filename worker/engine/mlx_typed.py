"""Two MLX calls with the precise types their stubs lack, stated once instead of a cast at every call.

`mlx.utils.tree_flatten` is annotated to return `list[tuple[str, Any]] | dict[str, Any]` (the dict only when it
is given a `destination` dict), and `mx.load` to return `array | dict[str, array] | tuple[...]` (the dict for a
`.safetensors` file loaded without `return_metadata`). The engine only uses those two forms.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten


def flat_arrays(tree: Any) -> list[tuple[str, mx.array]]:
    """`tree_flatten` of a tree of arrays (parameters, gradients, optimizer state): (dotted path, array) pairs."""
    return cast(list[tuple[str, mx.array]], tree_flatten(tree))


def flat_leaves(tree: Any, is_leaf: Callable[[Any], bool]) -> list[tuple[str, Any]]:
    """`tree_flatten` with a leaf predicate (e.g. `nn.Module.is_module`): (dotted path, leaf) pairs."""
    return cast(list[tuple[str, Any]], tree_flatten(tree, is_leaf=is_leaf))


def load_safetensors(path: str | Path) -> dict[str, mx.array]:
    """`mx.load` of a `.safetensors` file: name -> array."""
    return cast(dict[str, mx.array], mx.load(str(path)))
