"""Write docs/api.md, the API reference, from the docstrings of pmd's public API.

    python scripts/api_reference.py            # rewrite docs/api.md
    python scripts/api_reference.py --check    # exit 1 if docs/api.md is not what it would write

The public API is ``pmd.__all__`` (the Port, its queues and pool, the loopback, the
errors, ``open_port``) and the public names of ``pmd.arrow``, ``pmd.parse``,
``pmd.capture`` and ``pmd.abi.pcap`` (their ``__all__``, or else every function and
class the module defines whose name does not start with ``_``). For each: the signature
(``inspect.signature``; for a compiled class, the signature Cython embeds as the first line
of its docstring) and the docstring, and for a class every public method and property it
or a pmd base class defines. Nothing but the standard library and pmd is needed;
tests/test_api_reference.py fails when docs/api.md is stale or a public name has no
docstring.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
# The pmd of this checkout, not another one the interpreter may have installed.
if (ROOT / "pmd").is_dir() and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MODULES = ("pmd", "pmd.arrow", "pmd.parse", "pmd.capture", "pmd.abi.pcap")

HEADER = """\
# API reference

Generated from the docstrings by `python scripts/api_reference.py`; do not edit by hand
(`tests/test_api_reference.py` fails when this page is not what the script writes). The
modules: `pmd` (the Port, its queues and pool, the loopback, `open_port`, the errors),
`pmd.arrow` (bursts as Arrow record batches), `pmd.parse` (header columns), `pmd.capture`
(`pmd capture` as a function), `pmd.abi.pcap` (pcap and pcapng files). A walk-through:
`docs/tutorial.md`.
"""


class _Annotation:
    """An annotation kept as the text it was written as (``from __future__ import annotations``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _plain(sig: inspect.Signature) -> str:
    def ann(a: Any) -> Any:
        return _Annotation(a) if isinstance(a, str) else a

    params = [p.replace(annotation=ann(p.annotation)) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=ann(sig.return_annotation)))


def _embedded(obj: Any, name: str) -> tuple[str | None, str]:
    """(the signature Cython put on the docstring's first line, the rest of the docstring)."""
    doc = inspect.getdoc(obj) or ""
    first, _, rest = doc.partition("\n")
    m = re.match(rf"(?:\w+\.)*{re.escape(name)}(\(.*\))(?:\s*->\s*(.+))?$", first)
    if m:
        return m.group(1) + (f" -> {m.group(2)}" if m.group(2) else ""), rest.strip()
    return None, doc.strip()


def signature(obj: Any, name: str) -> tuple[str, str]:
    """(signature text, docstring) of a function, method or class."""
    sig_text, doc = _embedded(obj, name)
    if sig_text is None:
        try:
            sig_text = _plain(inspect.signature(obj))
        except (TypeError, ValueError):      # a built-in base's __init__ (an exception class)
            sig_text = "" if inspect.isclass(obj) else "(...)"
    return sig_text, doc


def public_names(module: Any) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return sorted(n for n, v in vars(module).items()
                  if not n.startswith("_") and (inspect.isfunction(v) or inspect.isclass(v))
                  and getattr(v, "__module__", None) == module.__name__)


_CDEF_ATTR = re.compile(r"^\s*cdef\s+(?:readonly|public)\s+(.+?)\s+(\w+)\s*(?:#\s*(.*?))?\s*$")


def cdef_attributes(cls: type) -> dict[str, tuple[str, str]]:
    """The ``cdef readonly`` (and ``public``) attributes of a compiled class, read from its
    module's .pxd and .pyx: name -> (C type, the comment on the line). Cython gives these
    attributes no docstring, so the comment is what documents them."""
    found: dict[str, tuple[str, str]] = {}
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if not path:
        return found
    stem = Path(path).name.split(".")[0]
    for ext in (".pxd", ".pyx"):
        source = Path(path).with_name(stem + ext)
        if not source.exists():
            continue
        current = None
        for line in source.read_text().splitlines():
            m = re.match(r"\s*cdef class (\w+)", line)
            if m:
                current = m.group(1)
                continue
            m = _CDEF_ATTR.match(line)
            if m and current == cls.__name__:
                found[m.group(2)] = (m.group(1), m.group(3) or "")
    return found


def _is_own(owner: type, cls: type) -> bool:
    # defined by the class or a base of its own package (pmd's), not by object, Exception, tuple...
    return owner.__module__.split(".")[0] == cls.__module__.split(".")[0]


def members(cls: type) -> Iterator[tuple[str, str, Any]]:
    """(name, kind, object) of the public methods and properties ``cls`` or a base of its
    package defines."""
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or not _is_own(owner, cls):
            continue
        raw = vars(owner)[name]
        if isinstance(raw, (staticmethod, classmethod)):
            yield name, "method", raw.__func__
        elif inspect.isgetsetdescriptor(raw) and name in cdef_attributes(owner):
            yield name, "attribute", (owner, name)
        elif isinstance(raw, property) or inspect.isgetsetdescriptor(raw) or inspect.ismemberdescriptor(raw):
            yield name, "property", raw
        elif callable(raw):
            yield name, "method", raw
        # plain class attributes (constants, dataclass defaults) are not listed


def entries() -> Iterator[tuple[str, str, str, Any]]:
    """(module, qualified name, kind, object) of everything the page lists, in page order."""
    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.isclass(obj):
                yield modname, name, "class", obj
                for mname, kind, member in members(obj):
                    yield modname, f"{name}.{mname}", kind, member
            elif callable(obj):
                yield modname, name, "function", obj
            else:
                yield modname, name, "data", obj


def _doc(obj: Any) -> str:
    return (inspect.getdoc(obj) or "").strip()


def render() -> str:
    out = [HEADER]
    current = None
    for modname, qualname, kind, obj in entries():
        if modname != current:
            current = modname
            out.append(f"\n## `{modname}`\n\n")
            mdoc = _doc(importlib.import_module(modname)).split("\n\n")[0]
            if mdoc:
                out.append(mdoc + "\n")
        short = qualname.rsplit(".", 1)[-1]
        if kind == "data":
            value = repr(obj)
            if len(value) > 200:
                value = value[:200] + " ..."
            out.append(f"\n### `{modname}.{qualname}`\n\n`{value}`\n")
            continue
        if kind == "attribute":
            ctype, comment = cdef_attributes(obj[0])[obj[1]]
            out.append(f"\n#### `{qualname}` (attribute, `{ctype}`, read-only)\n")
            if comment:
                out.append(f"\n{comment[0].upper()}{comment[1:]}.\n" if not comment.endswith(".") else f"\n{comment}\n")
            continue
        if kind == "property":
            heading, doc = f"#### `{qualname}` (property)", _doc(obj)
        else:
            sig, doc = signature(obj, short)
            if kind == "class":
                sig = sig.removesuffix(" -> None")
                heading = f"### class `{modname}.{qualname}{sig}`"
            elif kind == "function":
                heading = f"### `{modname}.{qualname}{sig}`"
            else:
                heading = f"#### `{qualname}{sig}`"
        out.append(f"\n{heading}\n")
        if doc:
            out.append(f"\n{doc}\n")
    return "".join(out)


def undocumented() -> list[str]:
    """Public classes, functions, methods and properties without a docstring of their own
    (a compiled class's ``cdef readonly`` attributes cannot have one: their type and
    comment are listed instead)."""
    missing = []
    for modname, qualname, kind, obj in entries():
        if kind in ("data", "attribute"):
            continue
        doc = _doc(obj) if kind == "property" else signature(obj, qualname.rsplit(".", 1)[-1])[1]
        if not doc:
            missing.append(f"{modname}.{qualname}")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale; write nothing")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is stale: run python scripts/api_reference.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
