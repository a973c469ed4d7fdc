"""A build's URI: readable configuration + a short hash of everything that shapes its output.

    qwen2.5-0.5b_e4m3_1xh200_sm90_3f1c9a0b2d4e

The hash covers the plan's inputs, the generator (every template, every codegen module and
llmqgen/layout.py: they compute the numbers the templates spell out), the llmqgen version, the NVRTC
version (the caller's: compile/ knows it) and the target arch. Same URI, same program and CUBIN.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .. import __version__
from ..plan.schema import Plan


def find_templates() -> Path:
    """The Jinja templates: `llmqgen/templates/` inside an installed wheel (the build maps the source
    tree's top-level `templates/` there), else the checkout's top-level `templates/` (editable installs,
    running from the source tree)."""
    pkg = Path(__file__).resolve().parent.parent
    for d in (pkg / "templates", pkg.parent / "templates"):
        if (d / "program.cu.j2").is_file():
            return d
    return pkg.parent / "templates"     # missing: render() then names the path it looked in


TEMPLATES_DIR = find_templates()
CODEGEN_DIR = Path(__file__).resolve().parent
LAYOUT_FILE = CODEGEN_DIR.parent / "layout.py"


def _tree_digest(root: Path, pattern: str) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def generator_digest(templates_dir: Path | None = None) -> str:
    """sha256 over the template tree, the codegen sources and the layouts they spell out."""
    return hashlib.sha256((_tree_digest(Path(templates_dir or TEMPLATES_DIR), "*")
                           + _tree_digest(CODEGEN_DIR, "*.py")
                           + hashlib.sha256(LAYOUT_FILE.read_bytes()).hexdigest()).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.\-]+", "-", text.lower()).strip("-")


def plan_uri(plan: Plan, arch: str, nvrtc: tuple[int, int], templates_dir: Path | None = None) -> str:
    """The build folder's name for `plan` on `arch`, compiled by NVRTC version `nvrtc` (major, minor)."""
    major, minor = nvrtc
    h = hashlib.sha256("\0".join([plan.inputs_hash(), generator_digest(templates_dir), __version__,
                                  f"nvrtc{major}.{minor}", arch]).encode()).hexdigest()[:12]
    inv = plan.inventory
    return "_".join([_slug(plan.model.name), plan.precision.matmul, f"{inv.count}x{_slug(inv.gpu.name)}",
                     arch.replace("_", ""), h])
