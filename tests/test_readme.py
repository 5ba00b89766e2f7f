"""The README's Python snippets run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has python examples"
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), {})


def test_docstring_examples_run():
    """The public API's docstring examples give what they show."""
    import doctest

    import torch
    from torch import nn

    import tritonjac
    from tritonjac import functional, module

    for mod in (module, functional):
        globs = {"torch": torch, "nn": nn, **vars(tritonjac), **vars(mod)}
        result = doctest.testmod(mod, globs=globs, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, f"{mod.__name__}: {result}"


def test_readme_names_every_registered_activation():
    from tritonjac.activations import REGISTRY

    text = README.read_text()
    missing = [name for name in REGISTRY if name != "identity" and f'`"{name}"`' not in text]
    assert not missing, f"README's API section does not list {missing}"
