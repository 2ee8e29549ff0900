"""A small evaluator for the ARM template expressions azuredeploy.json uses.

It resolves a template for one set of parameter values, so that the tests can
compare what the deployment would really get (the route's next hop, the probe
port, the subnet IDs...) rather than the spelling of the expressions.
Functions it does not know raise, so a new function in the template makes the
tests fail loudly instead of passing vacuously.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
RESOURCE_GROUP = "test-rg"
LOCATION = "testregion"


class Unresolvable(Exception):
    pass


_TOKEN = re.compile(r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+)|(?P<id>[A-Za-z_][A-Za-z0-9_]*)|(?P<sym>[(),.\[\]]))")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m:
            raise Unresolvable(f"cannot parse {text!r} at {pos}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class Evaluator:
    def __init__(self, template: dict, values: dict[str, Any]):
        self.template = template
        self.values = dict(values)
        self._var_cache: dict[str, Any] = {}
        self._param_cache: dict[str, Any] = {}
        self._indexes: dict[str, int] = {}

    # ----- public --------------------------------------------------------
    def resolve(self, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith("[[") or not (value.startswith("[") and value.endswith("]")):
                return value[1:] if value.startswith("[[") else value
            return self.expression(value[1:-1])
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        return value

    def expression(self, text: str) -> Any:
        toks = _tokens(text)
        val, pos = self._parse(toks, 0)
        if pos != len(toks):
            raise Unresolvable(f"trailing tokens in {text!r}")
        return val

    def parameter(self, name: str) -> Any:
        if name not in self._param_cache:
            spec = self.template["parameters"][name]
            if name in self.values:
                self._param_cache[name] = self.values[name]
            elif "defaultValue" in spec:
                self._param_cache[name] = self.resolve(spec["defaultValue"])
            else:
                raise Unresolvable(f"parameter {name} has no value and no default")
        return self._param_cache[name]

    def variable(self, name: str) -> Any:
        if name not in self._var_cache:
            variables = self.template["variables"]
            loops = {c["name"]: c for c in variables.get("copy", [])}
            if name in loops:
                self._var_cache[name] = self._copy(loops[name])
            else:
                self._var_cache[name] = self.resolve(variables[name])
        return self._var_cache[name]

    def _copy(self, loop: dict) -> list:
        """A variable copy loop: its input resolved once per index, with
        copyIndex(name) answering that index."""
        count = self.resolve(loop["count"])
        out = []
        for i in range(count):
            self._indexes[loop["name"]] = i
            out.append(self.resolve(loop["input"]))
        self._indexes.pop(loop["name"], None)
        return out

    # ----- parser ----------------------------------------------------------
    def _parse(self, toks, pos):
        kind, tok = toks[pos]
        if kind == "str":
            val, pos = tok[1:-1].replace("''", "'"), pos + 1
        elif kind == "num":
            val, pos = int(tok), pos + 1
        elif kind == "id":
            name = tok
            if toks[pos + 1] != ("sym", "("):
                raise Unresolvable(f"expected ( after {name}")
            pos += 2
            args = []
            # if() is evaluated lazily so that the branch not taken may hold
            # anything; the others take evaluated arguments.
            raw_args = []
            while toks[pos] != ("sym", ")"):
                start = pos
                _, pos = self._skip(toks, pos)
                raw_args.append((start, pos))
                if toks[pos] == ("sym", ","):
                    pos += 1
            pos += 1
            if name.lower() == "if":
                cond = self._parse(toks[: raw_args[0][1]], raw_args[0][0])[0]
                s, e = raw_args[1] if cond else raw_args[2]
                val = self._parse(toks[:e], s)[0]
            else:
                args = [self._parse(toks[:e], s)[0] for s, e in raw_args]
                val = self._call(name, args)
        else:
            raise Unresolvable(f"unexpected {tok!r}")
        # accessors: .prop and [index]
        while pos < len(toks) and toks[pos] in (("sym", "."), ("sym", "[")):
            if toks[pos] == ("sym", "."):
                key = toks[pos + 1][1]
                val, pos = val[key], pos + 2
            else:
                idx, pos = self._parse(toks, pos + 1)
                if toks[pos] != ("sym", "]"):
                    raise Unresolvable("expected ]")
                val, pos = val[idx], pos + 1
        return val, pos

    def _skip(self, toks, pos):
        """Skips one expression without evaluating it; returns (None, end)."""
        depth = 0
        while True:
            kind, tok = toks[pos]
            if kind == "sym" and tok in "([":
                depth += 1
            elif kind == "sym" and tok in ")]":
                if depth == 0:
                    return None, pos
                depth -= 1
            elif kind == "sym" and tok == "," and depth == 0:
                return None, pos
            pos += 1

    def _call(self, name: str, args: list) -> Any:
        n = name.lower()
        if n == "parameters":
            return self.parameter(args[0])
        if n == "variables":
            return self.variable(args[0])
        if n == "format":
            fmt = args[0]
            return re.sub(r"\{(\d+)\}", lambda m: _str(args[1 + int(m.group(1))]), fmt)
        if n == "concat":
            if all(isinstance(a, list) for a in args):
                return [x for a in args for x in a]
            return "".join(_str(a) for a in args)
        if n == "add":
            return args[0] + args[1]
        if n == "sub":
            return args[0] - args[1]
        if n == "copyindex":
            if args[0] not in self._indexes:
                raise Unresolvable(f"copyIndex({args[0]}) outside its loop")
            return self._indexes[args[0]]
        if n == "equals":
            return args[0] == args[1]
        if n == "string":
            return _str(args[0])
        if n == "trim":
            return args[0].strip()
        if n == "createarray":
            return list(args)
        if n == "createobject":
            return {args[i]: args[i + 1] for i in range(0, len(args), 2)}
        if n == "null":
            return None
        if n == "true":
            return True
        if n == "false":
            return False
        if n == "base64":
            return base64.b64encode(args[0].encode()).decode()
        if n == "uniquestring":
            return hashlib.sha256("|".join(map(_str, args)).encode()).hexdigest()[:13]
        if n == "resourcegroup":
            return {"location": LOCATION, "name": RESOURCE_GROUP,
                    "id": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}"}
        if n == "resourceid":
            rtype, names = args[0], args[1:]
            namespace, *types = rtype.split("/")
            if len(types) != len(names):
                raise Unresolvable(f"resourceId({rtype}) with {len(names)} names")
            path = "/".join(f"{t}/{nm}" for t, nm in zip(types, names))
            return f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/{namespace}/{path}"
        if n == "reference":
            return {"ipAddress": "203.0.113.1"}
        raise Unresolvable(f"unknown template function {name}()")


def _str(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)
