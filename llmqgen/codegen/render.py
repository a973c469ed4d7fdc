"""Render a plan into one program.cu (and its kernels' launch rows) with a line-exact source map.

The source map: the template loader puts an invisible marker naming template and line before the
first character of each text line of every template; after rendering, the markers are cut out of
the output and become the map, so an NVRTC error at program.cu:LINE is shown at _rmsnorm.cu.j2:LINE,
through includes, loops and macros alike. Output lines without a marker of their own (from lines
that start with a tag, or from a multi-line value) take the nearest one above (Origin.exact False).
"""
from __future__ import annotations

import functools
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import jinja2

from ..plan.schema import Plan
from . import families as families_pkg
from . import uri
from .context import build_context
from .kernel import Kernel

PROGRAM_TEMPLATE = "program.cu.j2"
COMMON_TEMPLATE = "_common.cu.j2"

_MARK_RE = re.compile("\x02(\\d+):(\\d+)\x03")
_TAG_RE = re.compile(r"\{\{|\{%|\{#|\}\}|%\}|#\}")
_CLOSE = {"{{": "}}", "{%": "%}", "{#": "#}"}
_KERNEL_NAME_RE = re.compile(r"^llmq_[a-z0-9]+(_[a-z0-9]+)+$")
_BOUNDS = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
_GLOBAL_RE = re.compile(r'extern\s+"C"\s+__global__\s+' + _BOUNDS + r"void\s+" + _BOUNDS + r"(\w+)\s*\(([^)]*)\)")


class RenderError(ValueError):
    pass


@dataclass(frozen=True)
class Origin:
    template: str
    line: int
    exact: bool  # False: no marker of its own; the nearest template line above it

    def __str__(self) -> str:
        return f"{self.template}:{self.line}" + ("" if self.exact else " (or just below)")


@dataclass
class Rendered:
    source: str
    kernels: list[Kernel]
    source_map: list[Origin | None]  # source_map[i]: origin of output line i + 1
    context: dict = field(repr=False)

    def origin(self, line: int) -> Origin | None:
        """Origin of 1-based output line `line`."""
        return self.source_map[line - 1] if 1 <= line <= len(self.source_map) else None


# --- marking loader -------------------------------------------------------------------------------

def mark_lines(source: str, tid: int) -> str:
    """Put the marker \\x02tid:line\\x03 before the first character of each line that starts in text.

    The marker goes after the indentation, so whitespace control (`-%}` eating the next lines'
    leading whitespace) strips exactly what it stripped before; lines starting with a tag (or
    inside one, or blank: a later `{%-` may strip back through them) get no marker."""
    out, open_tag = [], None
    for no, line in enumerate(source.split("\n"), 1):
        s = line.lstrip()
        if open_tag is None and s and not s.startswith(("{%", "{#", "{{-")):
            cut = len(line) - len(s)
            line = f"{line[:cut]}\x02{tid}:{no}\x03{s}"
        for m in _TAG_RE.finditer(line):
            tok = m.group()
            if open_tag is None and tok in _CLOSE:
                open_tag = tok
            elif open_tag is not None and tok == _CLOSE[open_tag]:
                open_tag = None
        out.append(line)
    return "\n".join(out)


class MarkingLoader(jinja2.FileSystemLoader):
    def __init__(self, searchpath):
        super().__init__(searchpath)
        self.names: list[str] = []

    def get_source(self, environment, template):
        source, filename, uptodate = super().get_source(environment, template)
        if template not in self.names:
            self.names.append(template)
        return mark_lines(source, self.names.index(template)), filename, uptodate


def _c_float(x: float) -> str:
    """A float as a C float literal that round-trips (e.g. 1e-06 -> 1e-06f, 10000 -> 10000.0f)."""
    text = repr(float(x))
    if text in ("inf", "-inf", "nan"):
        raise RenderError(f"{x} has no C float literal: compute it in the kernel (INFINITY, NAN)")
    return text + ("f" if ("." in text or "e" in text) else ".0f")


@functools.lru_cache(maxsize=4)
def make_env(templates_dir: str, marked: bool = True) -> jinja2.Environment:
    loader = (MarkingLoader if marked else jinja2.FileSystemLoader)(templates_dir)
    env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["f32"] = _c_float
    env.filters["cbool"] = lambda b: "true" if b else "false"
    return env


def _strip_marks(text: str, names: list[str]) -> tuple[str, list[Origin | None]]:
    lines, origins, last = [], [], None
    for raw in text.split("\n"):
        m = _MARK_RE.search(raw)
        if m:
            last = (names[int(m.group(1))], int(m.group(2)))
            origins.append(Origin(*last, exact=True))
        else:
            origins.append(None if last is None else Origin(*last, exact=False))
        lines.append(_MARK_RE.sub("", raw))
    return "\n".join(lines), origins


def _template_frame(tb) -> tuple[str, int] | None:
    """The innermost template frame of a Jinja traceback: (template file name, line)."""
    where = None
    while tb is not None:
        fname = tb.tb_frame.f_code.co_filename
        if fname.endswith(".j2"):
            where = (Path(fname).name, tb.tb_lineno)
        tb = tb.tb_next
    return where


def render_template(name: str, ctx: dict, templates_dir: Path | None = None) -> tuple[str, list]:
    """Render one template (with its includes): (text, source map)."""
    tdir = Path(templates_dir or uri.TEMPLATES_DIR)
    env = make_env(str(tdir))
    try:
        text = env.get_template(name).render(ctx)
    except jinja2.TemplateNotFound as e:
        raise RenderError(f"template {e.name} not found in {tdir}: the templates ship in the wheel as "
                          f"llmqgen/templates/ (a checkout has them in templates/): reinstall llmqgen") from None
    except jinja2.TemplateSyntaxError as e:
        raise RenderError(f"{e.name or name}:{e.lineno}: template syntax error: {e.message}") from e
    except jinja2.UndefinedError as e:
        where = _template_frame(sys.exc_info()[2])
        at = f"{where[0]}:{where[1]}" if where else name
        raise RenderError(f"{at}: {e.message}: the template uses a variable that neither build_context() "
                          f"nor its family's context() provides") from e
    return _strip_marks(text, env.loader.names)


# --- the program ----------------------------------------------------------------------------------

def _family_name(mod: ModuleType) -> str:
    return mod.__name__.rsplit(".", 1)[-1]


def _merge(ctx: dict, extra: dict, family: str) -> None:
    for k, v in extra.items():
        if k in ctx and ctx[k] != v:
            raise RenderError(f"family {family!r} sets context variable {k}={v!r}, already {ctx[k]!r}: "
                              f"give it a name of its own (prefix it with the family)")
        ctx[k] = v


def _kernel_params(source: str) -> dict[str, list[str]]:
    """extern "C" __global__ kernels of the source -> their parameter names."""
    found = {}
    for m in _GLOBAL_RE.finditer(source):
        plist = re.sub(r"//[^\n]*|/\*.*?\*/", " ", m.group(2), flags=re.S)
        params = [p.strip() for p in plist.split(",") if p.strip()]
        found[m.group(1)] = [re.findall(r"\w+", p)[-1] for p in params]
    return found


def check_kernels(kernels: list[Kernel], source: str, max_smem: int) -> None:
    """Every launch row names a real kernel of the source, with its parameters, and vice versa."""
    seen = set()
    params = _kernel_params(source)
    for k in kernels:
        if not _KERNEL_NAME_RE.match(k.name):
            raise RenderError(f"kernel name {k.name!r} is not of the form llmq_<op>_<variant>")
        if k.name in seen:
            raise RenderError(f"two kernels are named {k.name!r}: kernel names must be unique")
        seen.add(k.name)
        if k.name not in params:
            raise RenderError(f"kernel {k.name!r} has a launch row but the source has no "
                              f'extern "C" __global__ void {k.name}(...): check its family\'s template')
        if params[k.name] != [n for n, _ in k.args]:
            raise RenderError(f"kernel {k.name!r}: launch row args {[n for n, _ in k.args]} differ from the "
                              f"source's parameters {params[k.name]}")
        threads = k.block[0] * k.block[1] * k.block[2]
        if min(k.grid) < 1 or min(k.block) < 1 or threads > 1024:
            raise RenderError(f"kernel {k.name!r}: grid {k.grid} / block {k.block} is not launchable "
                              f"(positive sizes, at most 1024 threads)")
        if k.smem > max_smem:
            raise RenderError(f"kernel {k.name!r} asks {k.smem} bytes of shared memory, the GPU allows {max_smem}")
    unlaunched = sorted(set(params) - seen)
    if unlaunched:
        raise RenderError(f"kernels {unlaunched} are in the source but no family's kernels() launches them")


def render(plan: Plan, arch: str) -> Rendered:
    """The whole program of a plan for one target arch."""
    ctx = build_context(plan, arch)
    enabled = [f for f in families_pkg.load_families() if getattr(f, "enabled", lambda c: True)(ctx)]
    for fam in enabled:
        if hasattr(fam, "context"):
            _merge(ctx, fam.context(ctx), _family_name(fam))
    kernels = [k for fam in enabled for k in fam.kernels(ctx)]
    ctx["COMMON_TEMPLATE"] = COMMON_TEMPLATE
    ctx["FAMILY_TEMPLATES"] = [fam.TEMPLATE for fam in enabled]
    source, source_map = render_template(PROGRAM_TEMPLATE, ctx)
    check_kernels(kernels, source, ctx["MAX_SMEM"])
    return Rendered(source=source, kernels=kernels, source_map=source_map, context=ctx)


def _file_mode() -> int:
    """0o666 less the process umask: what open() would give a new file (mkstemp's files are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_if_different(path: Path, data: str | bytes) -> bool:
    """Write atomically (temporary file + rename), and only when the content changed: equal files
    keep their mtime. The file gets the usual mode (readable by the user's group and others as the
    umask allows). True when written."""
    blob = data.encode() if isinstance(data, str) else data
    if path.is_file() and path.read_bytes() == blob:
        return False
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True
