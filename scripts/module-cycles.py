#!/usr/bin/env python3
"""Import circles between the modules of each crate of the workspace; exits 1 when it finds one.

For every member crate's src/ it reads the paths that name a module of the same crate
(`crate::x::…`, `super::…`, `self::…`, grouped `use crate::{a, b::c}` included) and makes an
edge between the two sibling modules under the pair's nearest common parent: `a/b.rs` using
`crate::c::D` is an edge a → c at the crate's top level, `a/b.rs` using `super::d` an edge
b → d inside a. A strongly connected set of two or more siblings is a circle: the modules
cannot be understood, tested or split one at a time.

Not counted: references from inline `#[cfg(test)] mod …` blocks (a test may build fixtures
from anywhere), names reached through the crate root (`crate::Result`, re-exports), paths
inside macros' bodies written with `$crate`, and the binaries (src/main.rs, src/bin/), which
see the library as an outside crate.

Usage: scripts/module-cycles.py [--root DIR]
"""

import argparse
import pathlib
import re
import sys
from collections import defaultdict

TOKEN = re.compile(r"::|[A-Za-z_][A-Za-z0-9_]*|\S")


def strip(src):
    """The source with comments, strings and char literals blanked (newlines kept)."""
    out, i, n = [], 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append("\n" * src.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:i + 260]) and not (
                i and (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = len(re.match(r'r(#*)"', src[i:]).group(1))
            end = src.find('"' + "#" * hashes, i + 2 + hashes)
            end = n if end < 0 else end + 1 + hashes
            out.append('""' + "\n" * src.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'", src[i:i + 12])
            if m:
                out.append("' '")
                i += m.end()
            else:  # a lifetime or a label
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def tokens(text):
    """(token, line) pairs of stripped source."""
    line, pos = 1, 0
    for m in TOKEN.finditer(text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        yield m.group(), line


def module_path(src_dir, file):
    parts = list(file.relative_to(src_dir).with_suffix("").parts)
    if parts[-1] == "mod" or parts == ["lib"]:
        parts = parts[:-1]
    return parts


def read_path(toks, i):
    """The path segments starting at toks[i] and the index after them; a trailing `::{…}`
    group expands to one path per member."""
    segs = []
    while i < len(toks) and re.fullmatch(r"[A-Za-z_]\w*", toks[i][0]):
        segs.append(toks[i][0])
        if i + 1 < len(toks) and toks[i + 1][0] == "::":
            if i + 2 < len(toks) and toks[i + 2][0] == "{":
                paths, i = read_group(toks, i + 3)
                return [segs + p for p in paths], i
            i += 2
        else:
            return [segs], i + 1
    return [segs], i


def read_group(toks, i):
    """Members of a `{…}` use group (toks[i] is just after `{`) and the index after `}`."""
    paths = []
    while i < len(toks) and toks[i][0] != "}":
        if toks[i][0] == ",":
            i += 1
            continue
        if toks[i][0] == "*":
            paths.append([])
            i += 1
            continue
        if toks[i][0] == "{":
            inner, i = read_group(toks, i + 1)
            paths.extend(inner)
            continue
        found, j = read_path(toks, i)
        for p in found:
            paths.append([] if p[:1] == ["self"] else p)
        i = max(j, i + 1)
        if i < len(toks) and toks[i][0] == "as":
            i += 2
    return paths, i + 1


def references(text, here):
    """(target segments relative to the crate root, line, in_test) for each path in `text`,
    a file whose module path is `here`."""
    toks = list(tokens(text))
    refs, stack, depth = [], [], 0  # stack: (inline module name, depth at its `{`, is test)
    pending_test = False
    i = 0
    while i < len(toks):
        tok, line = toks[i]
        prev = toks[i - 1][0] if i else ""
        if tok == "#" and i + 6 < len(toks) and [t for t, _ in toks[i + 1:i + 6]] == [
                "[", "cfg", "(", "test", ")"]:
            pending_test = True
        elif tok == "mod" and i + 2 < len(toks) and toks[i + 2][0] == "{":
            stack.append((toks[i + 1][0], depth + 1, pending_test))
            pending_test = False
        elif tok == "{":
            depth += 1
        elif tok == "}":
            if stack and stack[-1][1] == depth:
                stack.pop()
            depth -= 1
        elif tok in ("fn", "struct", "enum", "impl", "use", "const", "static", "type", ";"):
            pending_test = False
        if tok in ("crate", "super", "self") and prev not in ("::", "$") and \
                i + 1 < len(toks) and toks[i + 1][0] == "::":
            paths, j = read_path(toks, i)
            cur = here + [name for name, _, _ in stack]
            in_test = any(t for _, _, t in stack)
            for p in paths:
                if p[0] == "crate":
                    target = p[1:]
                else:
                    base = list(cur)
                    while p and p[0] in ("super", "self"):
                        if p[0] == "super":
                            base = base[:-1]
                        p = p[1:]
                    target = base + p
                refs.append((target, line, in_test))
            i = j
            continue
        i += 1
    return refs


def inline_modules(text, here):
    """Module paths of the inline `mod x { … }` blocks of a file."""
    toks = [t for t, _ in tokens(text)]
    found, stack, depth = [], [], 0
    for k, tok in enumerate(toks):
        if tok == "mod" and k + 2 < len(toks) and toks[k + 2] == "{":
            stack.append((toks[k + 1], depth + 1))
            found.append(here + [n for n, _ in stack])
        elif tok == "{":
            depth += 1
        elif tok == "}":
            if stack and stack[-1][1] == depth:
                stack.pop()
            depth -= 1
    return found


def crate_cycles(src_dir, root):
    files = [f for f in sorted(src_dir.rglob("*.rs"))
             if f.name != "main.rs" and "bin" not in f.relative_to(src_dir).parts[:-1]]
    texts = {f: strip(f.read_text()) for f in files}
    modules = {tuple(module_path(src_dir, f)) for f in files}
    for f in files:
        modules.update(tuple(m) for m in inline_modules(texts[f], module_path(src_dir, f)))
    # namespace -> src -> dst -> [evidence]
    edges = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for f in files:
        here = module_path(src_dir, f)
        refs = references(texts[f], here)
        for target, line, in_test in refs:
            if in_test:
                continue
            while target and tuple(target) not in modules:
                target = target[:-1]
            common = 0
            while common < min(len(here), len(target)) and here[common] == target[common]:
                common += 1
            if common < len(here) and common < len(target):
                ns = "::".join(here[:common]) or "crate"
                ev = edges[ns][here[common]][target[common]]
                at = f"{f.relative_to(root)}:{line}"
                if at not in ev:
                    ev.append(at)
    cycles = []
    for ns, graph in sorted(edges.items()):
        for scc in strongly_connected(graph):
            if len(scc) > 1:
                cycles.append((ns, sorted(scc), graph))
    return cycles


def strongly_connected(graph):
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    nodes = set(graph) | {d for s in graph for d in graph[s]}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            out.append(scc)

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def members(root):
    text = (root / "Cargo.toml").read_text()
    m = re.search(r"members\s*=\s*\[(.*?)\]", text, re.S)
    return [root / s for s in re.findall(r'"([^"]+)"', m.group(1))] if m else [root]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=pathlib.Path(__file__).resolve().parent.parent,
                    type=pathlib.Path, help="workspace root (default: this repository)")
    args = ap.parse_args()
    failed = False
    for crate in members(args.root):
        src = crate / "src"
        if not src.is_dir():
            continue
        name = str(crate.relative_to(args.root))
        for ns, scc, graph in crate_cycles(src, args.root):
            failed = True
            where = "top level" if ns == "crate" else f"inside {ns}"
            print(f"CIRCLE: {name} ({where}): {' <-> '.join(scc)}")
            for a in scc:
                for b in scc:
                    if b in graph.get(a, {}):
                        ev = graph[a][b]
                        more = f" (+{len(ev) - 3} more)" if len(ev) > 3 else ""
                        print(f"    {a} -> {b}: {', '.join(ev[:3])}{more}")
    if failed:
        print("module-cycles: import circles found; move the shared types to the module that "
              "owns them so imports go one way")
        return 1
    print("module-cycles: no import circles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
