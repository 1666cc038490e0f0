"""STYLE.md's rules that a machine can check: a shape legend for every shape-suffixed name, docstrings."""

import ast
import glob
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODULES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "fmjax", "**", "*.py"), recursive=True))
SHAPED = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*_([A-Z]{1,6})")  # q_BTHK, logits_BTV, first_row_P
LEGEND = re.compile(r"(?:Shape legend|Legend|Shapes):(.*?)(?:\n\n|$)", re.S)


def _names(tree) -> set[str]:
  return {getattr(node, "id", None) or getattr(node, "arg", None) or getattr(node, "attr", None)
          for node in ast.walk(tree) if isinstance(node, (ast.Name, ast.arg, ast.Attribute))}


@pytest.mark.parametrize("module", MODULES)
def test_every_shape_letter_a_module_uses_is_in_its_legend(module):
  """STYLE.md: shape-suffixed names, with one legend of the letters at the top of the file."""
  tree = ast.parse(open(os.path.join(ROOT, module)).read())
  used = {}
  for name in _names(tree) - {None}:
    if match := SHAPED.fullmatch(name):
      for letter in match.group(1):
        used.setdefault(letter, name)
  if not used:
    return
  legend = LEGEND.search(ast.get_docstring(tree) or "")
  assert legend, f"{module} names tensors by shape ({', '.join(sorted(used.values()))}) but has no legend"
  letters = set(re.findall(r"(?<![A-Za-z])([A-Z])(?=[\s=])", legend.group(1)))
  missing = {letter: name for letter, name in used.items() if letter not in letters}
  assert not missing, f"{module}'s legend lacks {', '.join(f'{k} (in {v})' for k, v in sorted(missing.items()))}"


@pytest.mark.parametrize("module", MODULES)
def test_every_public_function_and_class_has_a_docstring(module):
  """STYLE.md: a docstring on each public function, short."""
  tree = ast.parse(open(os.path.join(ROOT, module)).read())
  missing = []
  for node in tree.body:
    public_class = isinstance(node, ast.ClassDef) and not node.name.startswith("_")
    members = [n for n in node.body if isinstance(n, ast.FunctionDef)] if public_class else []
    for n in [node, *members]:
      if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_") and not ast.get_docstring(n):
        missing.append(f"{n.name} (line {n.lineno})")
  assert not missing, f"{module}: no docstring on {', '.join(missing)}"
