"""Strategies from one generic spec string: ``"DiLoCo(H=50, codec='lowrank:8')"``."""

from __future__ import annotations

import ast
import difflib
import inspect

from pysim.strategies.base import STRATEGIES, Strategy


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"Name"`` or ``"Name(k=literal, ...)"`` -> (name, kwargs). Only literal keyword
    arguments are accepted (read with ``ast``, never evaluated)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a strategy spec is a non-empty string like \"DiLoCo(H=50)\", got {spec!r}")
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"cannot parse strategy spec {spec!r}; write it like \"DiLoCo(H=50, codec='lowrank:8')\"") \
            from None
    if isinstance(node, ast.Name):
        return node.id, {}
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        raise ValueError(f"strategy spec {spec!r} must be a name with keyword arguments only, "
                         f"like \"SPARTA(p=0.01)\"")
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"strategy spec {spec!r}: '**' is not allowed; name each argument")
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(f"strategy spec {spec!r}: argument {kw.arg} must be a literal (number, string, "
                             f"True/False/None), got {ast.unparse(kw.value)!r}") from None
    return node.func.id, kwargs


def strategy_class(name: str) -> type[Strategy]:
    """The registered class of a strategy name (case-insensitive)."""
    key = name.lower()
    if key not in STRATEGIES:
        close = difflib.get_close_matches(key, STRATEGIES, n=1)
        hint = f" (did you mean {STRATEGIES[close[0]].name}?)" if close else ""
        raise ValueError(f"unknown strategy {name!r}{hint}; known: {', '.join(c.name for c in STRATEGIES.values())}")
    return STRATEGIES[key]


def make_strategy(spec: str, **kwargs) -> Strategy:
    """A strategy from a name or spec, plus keyword arguments, all checked:
    ``make_strategy("DiLoCo(H=50, codec='lowrank:8')")``, ``make_strategy("SPARTA", p=0.01)``.
    Unknown names or arguments are a ValueError with a did-you-mean hint."""
    name, args = parse_spec(spec)
    cls = strategy_class(name)
    twice = sorted(set(args) & set(kwargs))
    if twice:
        raise ValueError(f"{cls.name}: argument {twice[0]!r} is given both in the spec and as a keyword")
    args.update(kwargs)
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    for arg in args:
        if arg not in allowed:
            lower = {a.lower(): a for a in allowed}
            close = [lower[arg.lower()]] if arg.lower() in lower else difflib.get_close_matches(arg, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{cls.name} got unknown argument {arg!r}{hint}; it takes {', '.join(allowed) or 'none'}")
    return cls(**args)
