"""Build a small, deterministic multi-group text corpus from text already on this machine.

``make demo`` and the tests need real text in a few clearly different *groups* (so that data
mixing has something visible to mix) without downloading anything. Every machine with Python
has the standard library and its docstrings; most Linux machines also have license texts and
man pages. Each group becomes ``<out_dir>/<group>.jsonl`` with one document per line::

    {"meta": {"group": "code", "source": "stdlib/json/decoder.py"}, "text": "..."}

Groups (built in this order; one is left out if this machine has too little of it):

``code``
    Python standard library ``*.py`` files (tests, ``site-packages`` and ``pydoc_data``
    excluded), one document per file.
``legal``
    License texts: the stdlib ``LICENSE.txt``, ``/usr/share/common-licenses/*``,
    ``/usr/share/doc/*/copyright`` and LICENSE/COPYING/NOTICE files from ``*.dist-info`` of
    the running environment; identical texts are kept once.
``prose``
    English prose: long stdlib docstrings (one document per module) and the topics of the
    Python language reference shipped in ``pydoc_data/topics.py``.
``docs``
    English man pages (``/usr/share/man/man*/``), roff markup roughly stripped.

Output is byte-identical across runs on the same machine: candidates are ordered by a hash
of their source name (a stable pseudo-random order, so a small budget still samples many
packages instead of the alphabetically first one), nothing depends on set order or time.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import inspect
import json
import os
import re
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_GROUP_BYTES",
    "GROUPS",
    "MIN_GROUP_BYTES",
    "DemoGroup",
    "build_demo_corpus",
]

#: Text bytes (UTF-8 of the documents, not of the JSON lines) per group by default. The
#: ``prose`` group tops out at about 1.8 MB on CPython 3.11, so a larger default would only
#: make the other groups bigger than it.
DEFAULT_GROUP_BYTES = 2_000_000
#: A group with less material than this (or than half the budget, if smaller) is left out.
MIN_GROUP_BYTES = 100_000
#: Groups in output order.
GROUPS: tuple[str, ...] = ("code", "legal", "prose", "docs")

_MIN_GROUPS = 3
# Once a group is nearly full, stop after this many documents in a row did not fit, so that
# filling the last few bytes does not read the whole source tree.
_MAX_MISSES = 64
_MIN_DOCSTRING_CHARS = 200
# Stub files (an empty ``__init__.py`` with one comment, a one-line license pointer) say
# nothing about their group.
_MIN_DOC_BYTES = 200
_MAX_FILE_BYTES = 16 << 20
_SKIP_STDLIB_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_LICENSE_PREFIXES = ("licen", "copying", "notice", "copyright")
_COMMON_LICENSES = Path("/usr/share/common-licenses")
_USR_SHARE_DOC = Path("/usr/share/doc")
_MAN_ROOT = Path("/usr/share/man")
# Characters that json.dumps(ensure_ascii=False) leaves raw but str.splitlines() splits on.
_LINE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


@dataclass(frozen=True)
class DemoGroup:
    """What was written for one group."""

    name: str
    path: Path
    documents: int
    bytes: int  # UTF-8 bytes of the document texts (the JSONL file is somewhat larger)
    sources: str  # human-readable description of where the documents came from


@dataclass(frozen=True)
class _Candidate:
    source: str  # relative path or identifier, stored in meta.source
    origin: str  # kind of source, for DemoGroup.sources
    load: Callable[[], str | None]
    family: str | None = None  # related documents, spread out in the order (default: source)


@dataclass
class _Collected:
    docs: list[tuple[str, str]]
    nbytes: int
    used: dict[str, int]  # origin label -> documents taken


# --------------------------------------------------------------------------------------------
# Public API


def build_demo_corpus(
    out_dir: str | Path,
    bytes_per_group: int = DEFAULT_GROUP_BYTES,
    groups: Sequence[str] | None = None,
) -> dict[str, DemoGroup]:
    """Write ``<out_dir>/<group>.jsonl`` for each group and return what was written.

    With ``groups=None`` every group this machine has enough material for is built, and at
    least three are required. Naming ``groups`` explicitly requires each named group. Nothing
    is written until every group has been collected; each file is replaced atomically.

    Raises:
        ValueError: unknown group name or non-positive budget.
        RuntimeError: too few groups (or a requested group) have enough material here.
    """
    if bytes_per_group <= 0:
        raise ValueError(f"bytes_per_group must be positive, got {bytes_per_group}")
    wanted = _resolve_groups(groups)
    need = min(MIN_GROUP_BYTES, max(1, bytes_per_group // 2))

    collected: dict[str, _Collected] = {}
    looked_at: list[str] = []
    for name in wanted:
        candidates, origins = _COLLECTORS[name]()
        got = _fill(name, candidates, bytes_per_group)
        if got.nbytes >= need:
            collected[name] = got
        else:
            looked_at.append(f"{name} ({got.nbytes} bytes found): {'; '.join(origins)}")

    missing = [name for name in wanted if name not in collected]
    if groups is not None and missing:
        raise RuntimeError(
            f"not enough text on this machine for group(s) {missing} (need {need} bytes "
            "each); looked at: " + " | ".join(looked_at)
        )
    if groups is None and len(collected) < _MIN_GROUPS:
        raise RuntimeError(
            f"only {len(collected)} group(s) {sorted(collected)} have >= {need} bytes of text "
            f"on this machine, need {_MIN_GROUPS}; too little in: " + " | ".join(looked_at)
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, DemoGroup] = {}
    for name, got in collected.items():
        path = out / f"{name}.jsonl"
        _write_jsonl_atomic(path, name, got.docs)
        described = ", ".join(f"{n} from {label}" for label, n in sorted(got.used.items()))
        result[name] = DemoGroup(name, path, len(got.docs), got.nbytes, described)
    return result


def _resolve_groups(groups: Sequence[str] | None) -> list[str]:
    if groups is None:
        return list(GROUPS)
    requested = [groups] if isinstance(groups, str) else list(groups)
    unknown = [g for g in requested if g not in GROUPS]
    if unknown or not requested:
        raise ValueError(f"unknown demo group(s) {unknown}; valid groups are {list(GROUPS)}")
    return [g for g in GROUPS if g in requested]


# --------------------------------------------------------------------------------------------
# Budget filling and output


def _fill(group: str, candidates: list[_Candidate], budget: int) -> _Collected:
    """Take whole documents in a stable pseudo-random order until the budget is full."""

    docs: list[tuple[str, str]] = []
    used: dict[str, int] = {}
    seen: set[bytes] = set()  # membership only, never iterated
    total = misses = 0
    for cand in _order(group, candidates):
        text = _normalize(cand.load())
        if not text:
            continue
        data = text.encode("utf-8")
        if len(data) < _MIN_DOC_BYTES:
            continue
        digest = hashlib.sha256(data).digest()
        if digest in seen:
            continue
        if total + len(data) > budget:
            if docs:
                misses += 1
                if misses >= _MAX_MISSES:
                    break
                continue
            # A single document larger than the whole budget: keep its leading lines.
            data = data[: data.rfind(b"\n", 0, budget + 1) + 1].rstrip()
            if not data:
                continue
            text = data.decode("utf-8")
        seen.add(digest)
        docs.append((cand.source, text))
        used[cand.origin] = used.get(cand.origin, 0) + 1
        total += len(data)
        misses = 0
        if total >= budget:
            break
    return _Collected(docs, total, used)


def _order(group: str, candidates: list[_Candidate]) -> list[_Candidate]:
    """Stable pseudo-random order that takes one document per family before any second one.

    Families keep one prolific source (e.g. thousands of ``gcloud_*`` man pages) from
    crowding out everything else when the budget is small.
    """

    def digest(name: str) -> bytes:
        return hashlib.sha256(f"{group}\0{name}".encode()).digest()

    families: dict[str, list[tuple[bytes, str, int]]] = {}
    for i, c in enumerate(candidates):
        families.setdefault(c.family or c.source, []).append((digest(c.source), c.source, i))
    keyed: list[tuple[int, bytes, str, bytes, str, int]] = []
    for family, members in families.items():
        family_digest = digest(family)
        for rank, (d, source, i) in enumerate(sorted(members)):
            keyed.append((rank, family_digest, family, d, source, i))
    keyed.sort()
    return [candidates[k[-1]] for k in keyed]


def _normalize(text: str | None) -> str:
    if not text:
        return ""
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _write_jsonl_atomic(path: Path, group: str, docs: list[tuple[str, str]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for source, text in docs:
                record = {"text": text, "meta": {"group": group, "source": source}}
                line = json.dumps(record, ensure_ascii=False, sort_keys=True)
                for raw, escaped in _LINE_BREAKS.items():
                    line = line.replace(raw, escaped)
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# File helpers


def _read_text(path: Path) -> str | None:
    """UTF-8 text of a file (``.gz`` decompressed), or None if unreadable or binary."""
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return None
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read(_MAX_FILE_BYTES + 1)
            if len(data) > _MAX_FILE_BYTES:
                return None
        else:
            data = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", errors="replace")


def _sorted_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir(), key=lambda p: p.name)
    except OSError:
        return []


def _walk_files(root: Path, skip_dirs: frozenset[str] = frozenset()) -> Iterator[Path]:
    """Regular files under ``root`` in sorted order, not following directory symlinks."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            yield Path(dirpath, name)


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_modules() -> list[tuple[str, Path]]:
    """(``stdlib/<relative path>``, path) of stdlib ``*.py`` files, tests excluded."""
    root = _stdlib_dir()
    if not root.is_dir():
        return []
    return [
        (f"stdlib/{p.relative_to(root).as_posix()}", p)
        for p in _walk_files(root, _SKIP_STDLIB_DIRS)
        if p.suffix == ".py" and not p.is_symlink()
    ]


def _python_label() -> str:
    return f"Python {sys.version_info.major}.{sys.version_info.minor}"


# --------------------------------------------------------------------------------------------
# Groups. Each collector returns its candidates (loaded lazily) and the places it looked.


def _collect_code() -> tuple[list[_Candidate], list[str]]:
    cands = [
        _Candidate(source, "stdlib modules", lambda p=path: _read_text(p))
        for source, path in _stdlib_modules()
        if not source.startswith("stdlib/pydoc_data/")  # generated prose, not code
    ]
    return cands, [f"{_python_label()} stdlib *.py under {_stdlib_dir()}: {len(cands)} files"]


def _collect_legal() -> tuple[list[_Candidate], list[str]]:
    found: list[tuple[str, str, Path]] = []
    origins: list[str] = []

    stdlib_license = _stdlib_dir() / "LICENSE.txt"
    if stdlib_license.is_file():
        found.append(("stdlib/LICENSE.txt", "Python LICENSE.txt", stdlib_license))
    origins.append(f"{stdlib_license}: {'found' if stdlib_license.is_file() else 'missing'}")

    n = len(found)
    for p in _sorted_dir(_COMMON_LICENSES):
        if p.is_file():
            found.append((f"common-licenses/{p.name}", str(_COMMON_LICENSES), p))
    origins.append(f"{_COMMON_LICENSES}/*: {len(found) - n} files")

    n = len(found)
    for pkg in _sorted_dir(_USR_SHARE_DOC):
        p = pkg / "copyright"
        if p.is_file():
            found.append((f"doc/{pkg.name}/copyright", f"{_USR_SHARE_DOC}/*/copyright", p))
    origins.append(f"{_USR_SHARE_DOC}/*/copyright: {len(found) - n} files")

    for site_dir in _site_package_dirs():
        n = len(found)
        for dist in _sorted_dir(site_dir):
            if dist.suffix != ".dist-info" or not dist.is_dir():
                continue
            for p in _walk_files(dist):
                rel = p.relative_to(dist)
                in_licenses = rel.parts[0] in ("licenses", "license_files")
                if in_licenses or p.name.lower().startswith(_LICENSE_PREFIXES):
                    source = f"site-packages/{dist.name}/{rel.as_posix()}"
                    found.append((source, "dist-info license files", p))
        origins.append(f"{site_dir}/*.dist-info license files: {len(found) - n} files")

    cands = [
        _Candidate(source, origin, lambda p=path: _read_text(p)) for source, origin, path in found
    ]
    return cands, origins


def _site_package_dirs() -> list[Path]:
    paths = sysconfig.get_paths()
    dirs: list[Path] = []
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and p not in dirs:
            dirs.append(p)
    return dirs


def _collect_prose() -> tuple[list[_Candidate], list[str]]:
    modules = _stdlib_modules()
    cands = [
        _Candidate(source, "stdlib docstrings", lambda p=path: _module_docstrings(p))
        for source, path in modules
    ]
    topics_path = _stdlib_dir() / "pydoc_data" / "topics.py"
    topics = _pydoc_topics(topics_path)
    for name in sorted(topics):
        cands.append(
            _Candidate(
                f"stdlib/pydoc_data/topics.py#{name}", "pydoc topics", lambda t=topics[name]: t
            )
        )
    origins = [
        f"docstrings >= {_MIN_DOCSTRING_CHARS} chars in {len(modules)} {_python_label()} "
        f"stdlib modules under {_stdlib_dir()}",
        f"{topics_path}: {len(topics)} topics",
    ]
    return cands, origins


def _module_docstrings(path: Path) -> str | None:
    """Long docstrings of a module, its classes and functions, in source order."""
    source = _read_text(path)
    if source is None:
        return None
    try:
        with warnings.catch_warnings():  # e.g. SyntaxWarning for "\d" on Python >= 3.12
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return None
    nodes = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    nodes.sort(key=lambda node: (node.lineno, node.col_offset))
    texts: list[str] = []
    for node in [tree, *nodes]:
        doc = ast.get_docstring(node, clean=False)
        if not doc:
            continue
        doc = inspect.cleandoc(doc)
        if len(doc) >= _MIN_DOCSTRING_CHARS and doc not in texts:
            texts.append(doc)
    return "\n\n".join(texts)


def _pydoc_topics(path: Path) -> dict[str, str]:
    """The ``topics`` dict of ``pydoc_data/topics.py``, read without importing it."""
    source = _read_text(path)
    if source is None:
        return {}
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
    return {}


def _collect_docs() -> tuple[list[_Candidate], list[str]]:
    cands: list[_Candidate] = []
    # Only the English sections (man1, man3, ...); translations live in /usr/share/man/<lang>.
    for section in _sorted_dir(_MAN_ROOT):
        if not re.fullmatch(r"man[0-9n][a-z0-9]*", section.name) or not section.is_dir():
            continue
        for p in _walk_files(section):
            if p.is_symlink() or not _MAN_PAGE_NAME.search(p.name):
                continue
            rel = p.relative_to(_MAN_ROOT).as_posix()
            family = re.split(r"[_.:-]", p.name, maxsplit=1)[0].lower()
            load = lambda p=p: _man_to_text(_read_text(p))  # noqa: E731
            cands.append(_Candidate(f"man/{rel}", "man pages", load, family))
    return cands, [f"{_MAN_ROOT}/man*/ (English man pages): {len(cands)} files"]


# ``ls.1.gz`` (Debian/Ubuntu) or uncompressed ``ls.1`` (macOS); .bz2/.xz pages are skipped.
_MAN_PAGE_NAME = re.compile(r"\.[0-9n][a-z0-9]*(\.gz)?$")


# --------------------------------------------------------------------------------------------
# Rough roff (man/mdoc) to plain text: enough to read, not a formatter.

# fmt: off
_GLYPHS = {
    "em": "--", "en": "-", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": '"', "rq": '"',
    "oq": "'", "cq": "'", "bu": "*", "co": "(c)", "rg": "(R)", "tm": "(TM)", "mu": "x",
    "ga": "`", "ti": "~", "ha": "^", "ba": "|", "bv": "|", "lh": "<=", "rh": "=>", "->": "->",
    "<-": "<-", "<=": "<=", ">=": ">=", "!=": "!=", "==": "==", "pl": "+", "eq": "=",
    "sl": "/", "rs": "\\", "at": "@", "sh": "#", "Do": "$", "L\"": '"', "R\"": '"',
    "C`": '"', "C'": '"', "Aq": "'", "--": "--", "PI": "pi",
}
_SINGLE_ESCAPES = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t",
                   "'": "'", "`": "`", ".": "."}
# mdoc (BSD/macOS pages): macro names also appear inline as arguments and are dropped there.
_MDOC_INLINE = frozenset([
    "Ar", "Cm", "Dv", "Em", "Er", "Ev", "Fa", "Fl", "Fn", "Ft", "Ic", "Li", "Nm", "Ns", "Op",
    "Pa", "Ql", "Sy", "Va", "Xr", "Dq", "Sq", "Pq", "Qq", "Aq", "Bq", "Brq", "It", "Oo", "Oc",
    "Xo", "Xc", "No", "Ap",
])
# fmt: on
_ROFF_ESCAPE = re.compile(
    r"""\\(?:
        [fF](?:\[[^\]]*\]|\(..|.)               # font change
      | s[-+]?(?:\[[^\]]*\]|\(..|'[^']*'|\d{1,2})  # size change
      | n[-+]?(?:\[[^\]]*\]|\(..|.)             # number register
      | [hvwoLlXZDbxNRSAHM]'[^']*'              # drawing, motion, width, ...
      | \*(?:\[(?P<str1>[^\]]*)\]|\((?P<str2>..)|(?P<str3>.))  # defined string
      | \[(?P<glyph1>[^\]]*)\]                  # named glyph
      | \((?P<glyph2>..)                        # two-character glyph
      | (?P<char>.)                             # anything else
    )""",
    re.VERBOSE,
)
_ROFF_COMMENT = re.compile(r'\\["#].*')
_FONT_ALTERNATING = frozenset({"BR", "BI", "IB", "IR", "RB", "RI"})
_MAN_TEXT_MACROS = frozenset({"B", "I", "SB", "SM", "IP", "SH", "SS"})
_MDOC_TEXT_MACROS = _MDOC_INLINE | {"Nd", "Dl", "D1", "Sh", "Ss"}
_HEADING_MACROS = frozenset({"SH", "SS", "Sh", "Ss"})
_TEXT_MACROS = _FONT_ALTERNATING | _MAN_TEXT_MACROS | _MDOC_TEXT_MACROS
_PARAGRAPH_MACROS = frozenset({"PP", "P", "LP", "Pp", "sp", "TP", "HP", "br"})
_ROFF_ARGS = re.compile(r'"((?:[^"]|"")*)"|(\S+)')


def _roff_inline(text: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m["str1"] or m["str2"] or m["str3"] or m["glyph1"] or m["glyph2"]
        if name is not None:
            return _GLYPHS.get(name, "")
        char = m["char"]
        return _SINGLE_ESCAPES.get(char, "") if char is not None else ""

    return _ROFF_ESCAPE.sub(sub, text)


def _man_to_text(source: str | None) -> str | None:
    if source is None:
        return None
    out: list[str] = []
    page_name = ""  # mdoc: a bare ``.Nm`` repeats the first name given
    skip_until_dots = False
    for raw in source.splitlines():
        if skip_until_dots:  # inside a .de / .ig block
            skip_until_dots = raw.strip() != ".."
            continue
        line = _ROFF_COMMENT.sub("", raw) if "\\" in raw else raw
        if line.startswith("'"):
            continue
        if not line.startswith("."):
            out.append(_roff_inline(line).rstrip())
            continue
        macro, _, rest = line[1:].strip().partition(" ")
        if macro in ("de", "de1", "am", "ig"):
            skip_until_dots = True
            continue
        if macro in _PARAGRAPH_MACROS:
            out.append("")
            continue
        if macro not in _TEXT_MACROS:
            continue
        args = [w or q.replace('""', '"') for q, w in _ROFF_ARGS.findall(rest)]
        if macro in _MDOC_TEXT_MACROS:
            if macro == "Nm":
                page_name = page_name or (args[0] if args else "")
                args = args or [page_name]
            args = _mdoc_words(macro, args)
        elif macro == "IP":
            args = args[:1]  # the tag; the second argument is an indent
        text = _roff_inline(("" if macro in _FONT_ALTERNATING else " ").join(args)).strip()
        if macro in _HEADING_MACROS:
            out.extend(["", text])
        elif text:
            out.append(text)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


def _mdoc_words(macro: str, args: list[str]) -> list[str]:
    """Drop inline mdoc macro names from arguments, keeping the dash that ``Fl`` stands for."""
    words: list[str] = []
    dash = macro == "Fl"
    for arg in args:
        if arg in _MDOC_INLINE:
            if dash:
                words.append("-")
            dash = arg == "Fl"
        else:
            words.append(f"-{arg}" if dash else arg)
            dash = False
    if dash:
        words.append("-")
    return words


_COLLECTORS: dict[str, Callable[[], tuple[list[_Candidate], list[str]]]] = {
    "code": _collect_code,
    "legal": _collect_legal,
    "prose": _collect_prose,
    "docs": _collect_docs,
}
