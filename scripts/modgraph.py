#!/usr/bin/env python3
"""Prints the module graph of a Rust crate from its `use crate::` lines and
`crate::x::` paths, and exits non-zero if the graph has a cycle.

Usage: scripts/modgraph.py nat-ebpf/src   (cargo xtask test runs it on every crate)
"""
import pathlib
import re
import sys


def graph(src):
    mods = {p.stem: p for p in pathlib.Path(src).glob("*.rs") if p.stem not in ("main", "lib")}
    edges = {m: set() for m in mods}
    for m, p in mods.items():
        # Doc links (`[`crate::x`]`) and comments are not dependencies.
        text = re.sub(r"//[^\n]*", "", p.read_text())
        # Tests may use what they test.
        text = text.split("#[cfg(test)]")[0]
        # `use crate::{a, b::c}` and `crate::a::f(...)` both name module a.
        for block in re.findall(r"use crate::\{([^;]*)\};", text, re.S):
            for name in re.findall(r"(?:^|[,{\s])(\w+)(?=::|\s*[,}]|\s*$)", block):
                if name in mods and name != m:
                    edges[m].add(name)
        for name in re.findall(r"crate::(\w+)", text):
            if name in mods and name != m:
                edges[m].add(name)
    return edges


def cycle(edges):
    state = {}

    def visit(m, path):
        state[m] = 1
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                return path + [m, n]
            if n not in state:
                c = visit(n, path + [m])
                if c:
                    return c
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            c = visit(m, [])
            if c:
                return c
    return None


def main():
    edges = graph(sys.argv[1] if len(sys.argv) > 1 else "nat-ebpf/src")
    for m in sorted(edges):
        print(f"{m} -> {', '.join(sorted(edges[m])) or '(nothing)'}")
    c = cycle(edges)
    if c:
        print("cycle: " + " -> ".join(c))
        sys.exit(1)
    print("no cycle")


if __name__ == "__main__":
    main()
