"""detr/__init__.py: the public names load on first use, and the type checkers' list matches them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import detr


def test_every_public_name_resolves_and_type_checkers_see_the_same_names():
    assert all(getattr(detr, name) is not None for name in detr.__all__)
    tree = ast.parse(Path(detr.__file__).read_text())
    (block,) = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert seen == dict(detr._MODULE_OF)  # same names, from the same modules


def test_modules_are_attributes_as_before():
    assert detr.precision.autocast is not None and "from_pretrained" in dir(detr)
    with pytest.raises(AttributeError, match="no_such_name"):
        detr.no_such_name  # noqa: B018
