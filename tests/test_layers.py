"""The house drawn from the imports: rooms on floors, arrows only down, no circle.

A room is a top-level folder of the package (``builder``, ``passes``, ...), one model under
``models/`` (``models/gemma4``) or a top-level module (``cli``, ``contract``, ...). Every
``fxport`` import in non-test code (``tests/``, ``bench/`` and ``examples/`` are clients, not
rooms), including the lazy ones inside functions, is an arrow from the importing room to the
imported one. The floors below say which way is down; an arrow to the same or a higher floor
climbs. :data:`ALLOWED_UP` is the exact list of arrows allowed to climb, each with where it is
and why: a new one fails here, and so does an entry whose arrow is gone (delete the entry, so the
list only shrinks). Inside the package no module imports itself back through others, lazy
imports included (no exception). Reading the ~150 files takes well under a second.
"""

from __future__ import annotations

import ast
import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository root is the fxport package
CLIENTS = {"tests", "bench", "examples", "docs", "build"}

# Top to bottom. An arrow goes to a strictly lower floor; rooms on one floor import neither way.
FLOORS = [
    ["cli"],
    ["demo"],
    ["builder"],  # every pipeline: calls backends, passes, the model
    ["runtime"],  # runs programs; reads the model's tokenizer and config
    ["models/gemma4", "models"],  # only the model (models/__init__.py: the package of models)
    ["lowering"],  # backends only
    ["passes"],
    ["debug"],
    ["quant"],  # produces the int4 layout the kernels define
    ["kernels"],  # ops over that layout; imports nothing of fxport
    ["weights"],  # weight-file readers (GGUF), read by models/ and quant/
    ["contract", "fileio"],
]

# Arrows that climb: (from, to) -> where and why. Exact: add none; delete an entry when its arrow goes.
ALLOWED_UP: dict[tuple[str, str], str] = {}

# Arrows that point down but must not exist (issue 25: the model imports neither passes nor backends).
FORBIDDEN = {("models/gemma4", "passes"), ("models/gemma4", "lowering")}


def _modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of every non-client .py file of the package."""
    out = {}
    for folder, subdirs, files in os.walk(ROOT):
        top = Path(folder) == ROOT
        subdirs[:] = sorted(d for d in subdirs if not (d.startswith(".") or d == "__pycache__" or d.endswith(".egg-info")
                                                       or (top and d in CLIENTS)))
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = Path(folder) / f
            parts = ["fxport", *path.relative_to(ROOT).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fxport modules (or packages) ``name`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            # the longest fxport module the target names (``fxport.quant.packed.pack_int4`` -> the module)
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and t != "fxport":
                out.add(t)
    return out


def _room(module: str) -> str:
    parts = module.split(".")[1:]
    return "/".join(parts[:2]) if parts[0] == "models" and len(parts) > 1 else parts[0]


@functools.lru_cache(maxsize=None)
def _graphs():
    """(modules, module imports, room arrows -> the files that make them), read once per session."""
    modules = _modules()
    edges = {m: _imports(m, p, modules) for m, p in modules.items()}
    arrows: dict[tuple[str, str], set[str]] = {}
    for m, targets in edges.items():
        for t in targets:
            if _room(m) != _room(t):
                arrows.setdefault((_room(m), _room(t)), set()).add(str(modules[m].relative_to(ROOT)))
    return modules, edges, arrows


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one node (Tarjan, iterative)."""
    index, low, stack, on, groups, counter = {}, {}, [], set(), [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                group = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    group.add(w)
                    if w == v:
                        break
                if len(group) > 1:
                    groups.append(group)
    return groups


def test_every_room_has_a_floor():
    modules, _, _ = _graphs()
    placed = {room for floor in FLOORS for room in floor}
    rooms = {_room(m) for m in modules if m != "fxport"}
    assert sorted(rooms - placed) == [], "place each new room on a floor in FLOORS"


def test_arrows_climb_only_where_allowed():
    _, _, arrows = _graphs()
    floor = {room: i for i, rooms in enumerate(FLOORS) for room in rooms}
    climbing = {a: sorted(files) for a, files in arrows.items()
                if a[0] in floor and a[1] in floor and floor[a[1]] <= floor[a[0]]}
    new = {f"{a} <- {files}" for a, files in climbing.items() if a not in ALLOWED_UP}
    assert sorted(new) == [], "imports that climb: move the shared code down a floor"
    gone = sorted(a for a in ALLOWED_UP if a not in climbing)
    assert gone == [], "these arrows no longer climb: delete them from ALLOWED_UP"


def test_no_circle_between_rooms_but_through_allowed_arrows():
    _, _, arrows = _graphs()
    rooms: dict[str, set[str]] = {}
    for a, b in arrows:
        if (a, b) not in ALLOWED_UP:
            rooms.setdefault(a, set()).add(b)
            rooms.setdefault(b, set())
    assert _cycles(rooms) == []


def test_forbidden_arrows():
    _, _, arrows = _graphs()
    assert sorted(f"{a} <- {sorted(arrows[a])}" for a in FORBIDDEN if a in arrows) == []


def test_no_module_imports_itself_back():
    _, edges, _ = _graphs()
    cycles = sorted(sorted(c) for c in _cycles(edges))
    assert cycles == [], (
        "modules that import each other: import the shared name from a module below both "
        "(in runtime/: fxport.runtime.backend, fxport.runtime.eager_backend) and move the caller of both "
        "above them (fxport.runtime.speculative_bench)")


def test_the_drawing_sees_lazy_and_relative_imports():
    """The checks above read what they claim: a function-level import and a relative one are arrows."""
    modules, edges, arrows = _graphs()
    assert "fxport.runtime.speculative" in edges["fxport.runtime.generate"]  # inside generate()
    assert "fxport.runtime.backend" in edges["fxport.runtime.generate"]  # `from .backend import ...`
    assert "fxport.kernels.int4_layout" in edges["fxport.quant.packed"]
    assert ("quant", "weights") in arrows and ("quant", "models/gemma4") not in arrows
    assert ("kernels", "quant") not in arrows and ("quant", "kernels") in arrows
