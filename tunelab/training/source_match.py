"""Whether a function's code is exactly a known reference, so a fused replacement computes the same thing.

The fused modules (gated MLP, RMSNorm, rotary embedding) replace transformers code that many architectures copy
verbatim; a class or function with the same name and different code (Gemma's 1 + weight, an extra scale,
interleaved rotary halves) must be left alone. Bodies are compared as syntax trees, so formatting, comments and
docstrings do not matter, and a newer transformers that changes the code is simply not fused.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap


def _body(tree: ast.AST) -> str:
    fn = next(node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    return "\n".join(ast.dump(node) for node in body)


@functools.cache
def _reference_body(reference: str) -> str:
    return _body(ast.parse(textwrap.dedent(reference)))


@functools.cache
def _code_body(fn) -> str | None:
    try:
        return _body(ast.parse(textwrap.dedent(inspect.getsource(fn))))
    except (OSError, TypeError, SyntaxError, StopIteration):
        return None


def same_code(fn, *references: str) -> bool:
    """Whether `fn`'s body (docstring aside) is one of the reference functions' bodies, statement for statement."""
    body = _code_body(fn)
    return body is not None and any(body == _reference_body(r) for r in references)
