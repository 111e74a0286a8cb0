"""No function in ``portattn/`` takes more than ``MAX_PARAMETERS`` parameters -- Triton kernels and
their helpers included, which pass related values as one tuple instead (a tensor with its strides,
a call's feature values). Positional, keyword-only, ``*args`` and ``**kwargs`` count one each.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "portattn"
MAX_PARAMETERS = 40


def parameter_count(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> int:
    args = node.args
    return (len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            + (args.vararg is not None) + (args.kwarg is not None))


def functions(path: Path):
    """(qualified name, line, parameter count) of every function and lambda in one file."""
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                name = getattr(child, "name", "<lambda>")
                found.append((".".join((*scope, name)), child.lineno, parameter_count(child)))
                visit(child, (*scope, name))
            elif isinstance(child, ast.ClassDef):
                visit(child, (*scope, child.name))
            else:
                visit(child, scope)

    visit(ast.parse(path.read_text(), filename=str(path)), ())
    return found


def test_counting():
    tree = ast.parse("def f(a, /, b, *c, d, e=1, **g): pass\nh = lambda x, y: x")
    assert [parameter_count(n) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))] == [6, 2]


def test_no_function_takes_more_than_40_parameters():
    too_many = [f"{path.relative_to(PACKAGE.parent)}:{line} {name} ({count} parameters)"
                for path in sorted(PACKAGE.rglob("*.py"))
                for name, line, count in functions(path) if count > MAX_PARAMETERS]
    assert not too_many, f"functions with more than {MAX_PARAMETERS} parameters:\n" + "\n".join(too_many)
