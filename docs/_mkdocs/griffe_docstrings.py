"""Griffe extension: show the library's docstrings, written in torch's reST-flavoured Google style, as Markdown.

The library writes its docstrings the way torch does (STYLE.md): Google sections, ``:class:`` / ``:func:`` roles,
``:math:`` and ``.. math::``, ``Example::`` literal blocks. mkdocstrings renders Markdown, so this extension
rewrites each docstring at build time, without touching the source:

- roles become code spans, and a link (``[`name`][path]``, resolved by mkdocs-autorefs) when the target is a
  public object of the API reference; every other target (torch, private helpers) stays plain code, so a strict
  build never fails on a reference the site cannot show;
- ``:math:`x``` becomes a code span, in Unicode when every command in it has a symbol (``‖w‖/ρ``), and
  ``.. math::`` a fenced ``latex`` block: the site loads no external JavaScript (no MathJax from a CDN), so
  formulas are shown as their source;
- ``Example::`` becomes a Google ``Examples:`` section (doctest blocks highlighted), and any other paragraph
  ending in ``::`` a paragraph ending in ``:`` followed by a fenced code block;
- ``a, b: description`` in an ``Args:`` section (torch's ``device, dtype:``) becomes one entry per name;
- docstrings set at run time (``__doc__ = ...``, as the layers' shared template does) are read by importing
  the object, and module constants documented with ``#:`` comments get those comments as their docstring.

Both mkdocs (``mkdocs.yml``) and ``tests/test_docs_site.py`` load this file, so the test checks the docstrings
the site shows.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

import griffe

#: The modules whose ``__all__`` make up the API reference (``docs/api/*.md``), in page order.
PUBLIC_MODULES = ("normdecouple", "normdecouple.functional", "normdecouple.fuse", "lightning_callbacks")

_ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|attr|mod|data|exc|obj|const|math):`(?P<body>[^`]+)`")
_LITERAL_INTRO = re.compile(r"^(?P<indent>\s*)(?P<text>.*?)(?P<colons>::)\s*$")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*(?P<inline>.*)$")
_MULTI_NAME_ARG = re.compile(r"^(?P<indent>\s+)(?P<names>\w+(?:\s*,\s*\w+)+)\s*:(?P<rest>.*)$")
_SECTION = re.compile(r"^(?P<indent>\s*)(?P<title>[A-Z][\w ]*):\s*$")


def public_objects() -> dict[str, str]:
    """Every object the API reference renders, as ``{canonical path: public path}``.

    The canonical path is where the object is defined (``normdecouple.batchnorm.L1BatchNorm2d``), the public path
    where the reference shows it (``normdecouple.L1BatchNorm2d``); public paths map to themselves. Methods and
    properties with a docstring are included under their class. Modules that cannot be imported (Lightning not
    installed) are left out.
    """
    mapping: dict[str, str] = {}
    for module_name in PUBLIC_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        mapping[module_name] = module_name
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            public = f"{module_name}.{name}"
            mapping[public] = public
            canonical = _canonical_path(obj)
            if canonical:
                mapping.setdefault(canonical, public)
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if member.startswith("_") or not _doc_of(value):
                        continue
                    mapping[f"{public}.{member}"] = f"{public}.{member}"
                    if canonical:
                        mapping.setdefault(f"{canonical}.{member}", f"{public}.{member}")
    return mapping


def _canonical_path(obj: Any) -> str | None:
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{qualname}" if isinstance(module, str) and isinstance(qualname, str) else None


def _doc_of(value: Any) -> str | None:
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        return value.__doc__
    return value.__doc__ if inspect.isfunction(value) else None


def _resolve(target: str, public: dict[str, str], context: str) -> str | None:
    """The public path ``target`` names, or None; a bare name is looked up next to ``context`` as Sphinx does."""
    target = target.lstrip(".")
    candidates = [target]
    parts = context.split(".")
    candidates += [".".join(parts[:i] + [target]) for i in range(len(parts), 0, -1)]
    for candidate in candidates:
        if candidate in public:
            return public[candidate]
    return None


_SYMBOLS = {
    r"\lVert": "‖", r"\rVert": "‖", r"\Vert": "‖", r"\|": "‖", r"\lvert": "|", r"\rvert": "|",
    r"\alpha": "α", r"\beta": "β", r"\gamma": "γ", r"\delta": "δ", r"\epsilon": "ε", r"\varepsilon": "ε",
    r"\eta": "η", r"\lambda": "λ", r"\mu": "μ", r"\pi": "π", r"\rho": "ρ", r"\sigma": "σ", r"\theta": "θ",
    r"\nabla": "∇", r"\infty": "∞", r"\cdot": "·", r"\times": "×", r"\leftarrow": "←", r"\to": "→",
    r"\le": "≤", r"\ge": "≥", r"\leq": "≤", r"\geq": "≥", r"\approx": "≈", r"\ne": "≠", r"\in": "∈",
    r"\sum": "Σ", r"\,": " ", r"\;": " ", r"\quad": " ",
}
_COMMAND = re.compile(r"\\(?:[A-Za-z]+|[,;|])")


def inline_math(latex: str) -> str:
    """A short ``:math:`` formula in plain Unicode (``\\lVert w\\rVert/\\rho`` -> ``‖w‖/ρ``) when every command
    in it has a symbol, else its LaTeX source: the site renders no LaTeX (no script from a CDN)."""
    text = re.sub(r"\\(?:text|operatorname|mathrm|mathbf)\{([^{}]*)\}", r"\1", latex)
    text = re.sub(r"\\hat\s*\{?w\}?", "ŵ", text)
    text = re.sub(r"\\(lVert|lvert)\s*", lambda m: _SYMBOLS["\\" + m.group(1)], text)  # an opening bar

    def symbol(match: re.Match[str]) -> str:
        return _SYMBOLS.get(match.group(0), match.group(0))

    text = _COMMAND.sub(symbol, text)
    text = re.sub(r"\^\{([^{}]*)\}", r"^\1", text)
    text = re.sub(r"_\{([^{}]*)\}", r"_\1", text)
    return latex if "\\" in text or "{" in text else re.sub(r"\s+", " ", text).strip()


def convert_roles(text: str, public: dict[str, str], context: str) -> str:
    """``:role:`target``` to a code span, linked when ``target`` is a public object of the reference."""

    def replace(match: re.Match[str]) -> str:
        role, body = match["role"], match["body"]
        if role == "math":
            return f"`{inline_math(body)}`"
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
        if explicit:
            title, target = explicit["title"], explicit["target"]
        else:
            target = body
            title = body.lstrip("~").rsplit(".", 1)[-1] if body.startswith("~") else body
        target = target.lstrip("~")
        resolved = _resolve(target, public, context)
        return f"[`{title}`][{resolved}]" if resolved else f"`{title}`"

    return _ROLE.sub(replace, text)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _take_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The lines from ``start`` indented deeper than ``base`` (blank lines inside kept), and the index after."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) > base):
        end += 1
    while end > start and not lines[end - 1].strip():
        end -= 1
    return lines[start:end], end


def _fence(block: list[str], indent: str, language: str) -> list[str]:
    depth = min(_indent_of(line) for line in block if line.strip())
    body = [line[depth:] if line.strip() else "" for line in block]
    return [f"{indent}```{language}", *[f"{indent}{line}" if line else "" for line in body], f"{indent}```"]


def convert_blocks(text: str) -> str:
    """``.. math::``, ``Example::`` and other ``::`` literal blocks to Markdown; ``a, b:`` arguments split."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    in_args = False
    args_indent = 0
    while i < len(lines):
        line = lines[i]
        section = _SECTION.match(line)
        if section:
            in_args = section["title"].lower() in {"args", "arguments", "parameters", "params"}
            args_indent = len(section["indent"])
        elif line.strip() and _indent_of(line) <= args_indent and not section:
            in_args = False
        math = _MATH_DIRECTIVE.match(line)
        if math:
            base = len(math["indent"])
            block, i = _take_block(lines, i + 1, base)
            if math["inline"].strip():
                block = [" " * (base + 4) + math["inline"].strip(), *block]
            if any(b.strip() for b in block):
                out += _fence(block, math["indent"], "latex")
            continue
        literal = _LITERAL_INTRO.match(line)
        if literal and not line.lstrip().startswith(".."):
            base = len(literal["indent"])
            text_before = literal["text"].rstrip()
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            block, end = _take_block(lines, j, base) if j < len(lines) and _indent_of(lines[j]) > base else ([], j)
            if block:
                if text_before.lower() in {"example", "examples"}:
                    # A Google section: griffe parses its doctest lines into highlighted examples.
                    out += [f"{literal['indent']}Examples:", *block]
                else:
                    language = "pycon" if block[0].lstrip().startswith(">>>") else "python"
                    out += [f"{literal['indent']}{text_before}:" if text_before else "", ""]
                    out += _fence(block, literal["indent"], language)
                i = end
                continue
        if in_args:
            multi = _MULTI_NAME_ARG.match(line)
            if multi and _indent_of(line) > args_indent:
                names = [name.strip() for name in multi["names"].split(",")]
                continuation, end = _take_block(lines, i + 1, _indent_of(line))
                for name in names:
                    out += [f"{multi['indent']}{name}:{multi['rest']}", *continuation]
                i = end
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


def to_markdown(text: str, public: dict[str, str], context: str) -> str:
    """A docstring in the library's reST-flavoured Google style, as the Markdown mkdocstrings renders."""
    return convert_roles(convert_blocks(text), public, context)


def _walk(obj: griffe.Object) -> Iterator[griffe.Object]:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _runtime_docstring(obj: griffe.Object) -> str | None:
    try:
        module = importlib.import_module(obj.module.path)
    except ImportError:
        return None
    value: Any = module
    for part in obj.path[len(obj.module.path) + 1 :].split("."):
        value = getattr(value, part, None)
    # The object's own docstring: inspect.getdoc would hand a class without one its base class's.
    doc = getattr(value, "__doc__", None) if inspect.isclass(value) or inspect.isroutine(value) else None
    return inspect.cleandoc(doc) if isinstance(doc, str) else None


def _comment_docstring(attr: griffe.Object) -> str | None:
    """The ``#:`` comment lines right above a module attribute's assignment (Sphinx's attribute comments)."""
    if attr.lineno is None:
        return None
    lines = attr.module.lines
    comment: list[str] = []
    index = attr.lineno - 2
    while index >= 0 and lines[index].lstrip().startswith("#:"):
        comment.insert(0, lines[index].lstrip()[2:].strip())
        index -= 1
    return " ".join(comment) or None


class ReSTDocstrings(griffe.Extension):
    """Rewrites every docstring of a loaded package as Markdown (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._public = public_objects()

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        for obj in _walk(pkg):
            if obj.docstring is None:
                if obj.is_class or obj.is_function:
                    text = _runtime_docstring(obj)
                elif obj.is_attribute and obj.parent is not None and obj.parent.is_module:
                    text = _comment_docstring(obj)
                else:
                    text = None
                if not text:
                    continue
                obj.docstring = griffe.Docstring(
                    text, parent=obj, parser=loader.docstring_parser, parser_options=loader.docstring_options
                )
            # The docstring parser follows the object's own (the handler's) choice; only the text changes.
            obj.docstring.value = to_markdown(obj.docstring.value, self._public, obj.path)


__all__ = ["PUBLIC_MODULES", "ReSTDocstrings", "convert_blocks", "convert_roles", "public_objects", "to_markdown"]
