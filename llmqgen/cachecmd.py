"""`llmqgen cache`: where the caches live, what is in them, and clearing them.

One folder, $LLMQGEN_CACHE_DIR or ~/.cache/llmqgen, holds four caches:

    cubin/<k[:2]>/<key>/     compiled programs (compile/cache.py), keyed by source, options, arch, NVRTC
    nvrtc-headers/<ver>/     the CUDA headers NVRTC >= 13.3 unpacks on first use
    corpus/<id>/             the default corpus, tokenized once (data/corpus.py)
    gemm/<GPU, cuBLASLt>/    the GEMM algorithms timed on this machine (runtime/gemm_search.py)

All four are remade on demand, so clearing costs only time (clearing gemm/ can change a later build's
algorithms, so its results need not repeat an earlier build's bit for bit). `build/<uri>/` folders are outputs, not
caches. `clear` removes only these four folders (and their lock files), never the rest of the folder.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from .compile.nvrtc import usable_cache_root
from .hardware.inventory import human_bytes as human

KINDS = {"cubin": "compiled programs (CUBIN + compile log)",
         "nvrtc-headers": "CUDA headers unpacked by NVRTC",
         "corpus": "the default corpus, tokenized",
         "gemm": "GEMM algorithms timed on this machine"}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += (Path(dirpath) / f).stat().st_size
            except OSError:
                pass
    return total


def entries(root: Path, kind: str) -> list[Path]:
    """The entries of one cache: CUBIN entries sit two levels down (cubin/<k[:2]>/<key>)."""
    base = root / kind
    if not base.is_dir():
        return []
    try:
        if kind == "cubin":
            return sorted(e for d in base.iterdir() if d.is_dir() for e in d.iterdir() if e.is_dir())
        return sorted(e for e in base.iterdir() if e.is_dir())
    except OSError as e:
        _fail(f"cannot read {e.filename or base}: {e.strerror or e} (give it read permission, or delete it)")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _root() -> Path:
    try:
        return usable_cache_root()
    except ValueError as e:
        _fail(str(e))


def _where(root: Path) -> str:
    how = "$LLMQGEN_CACHE_DIR" if os.environ.get("LLMQGEN_CACHE_DIR") else "default; set LLMQGEN_CACHE_DIR to move it"
    return f"cache: {root} ({how})"


@click.group(invoke_without_command=True)
@click.option("--all", "show_all", is_flag=True, help="List every entry (default: the 5 largest of each kind).")
@click.pass_context
def cache(ctx, show_all):
    """Show the caches: location, entries and sizes (`llmqgen cache clear` empties them)."""
    if ctx.invoked_subcommand is not None:
        return
    root = _root()
    click.echo(_where(root))
    total = 0
    for kind, what in KINDS.items():
        items = [(e, _size(e)) for e in entries(root, kind)]
        size = sum(s for _, s in items)
        total += size
        click.echo(f"  {kind + '/':<15} {len(items):>4} entr{'y' if len(items) == 1 else 'ies'}  "
                   f"{human(size):>10}  {what}")
        items.sort(key=lambda t: -t[1])
        for e, s in items if show_all else items[:5]:
            click.echo(f"      {e.name[:40]:<40} {human(s):>10}")
        if not show_all and len(items) > 5:
            click.echo(f"      ... {len(items) - 5} more (--all lists them)")
    click.echo(f"  total {human(total)}; everything here is remade on demand. Builds (build/<uri>/) are "
               f"outputs, not cache.")


@cache.command()
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--only", type=click.Choice(list(KINDS)), multiple=True,
              help="Clear only this cache (repeatable; default: all four).")
def clear(yes, only):
    """Delete the cached CUBINs, unpacked NVRTC headers, the tokenized default corpus and timed GEMM algorithms."""
    root = _root()
    kinds = list(only or KINDS)
    targets = [root / k for k in kinds if (root / k).exists()]
    if not targets:
        click.echo(f"nothing to clear: no {', '.join(k + '/' for k in kinds)} under {root}")
        return
    size = sum(_size(t) for t in targets)
    counts = {t: len(entries(root, t.name)) for t in targets}
    names = ", ".join(f"{t.name}/ ({n} entr{'y' if n == 1 else 'ies'})" for t, n in counts.items())
    if not yes:
        try:
            ok = click.confirm(f"delete {names} under {root}, {human(size)}?", default=False)
        except click.Abort:             # no answer (no terminal, EOF): a script meant to clear did not
            _fail("nothing cleared: answer y, or pass --yes")
        if not ok:                      # the user said no: nothing to report as an error
            click.echo("nothing cleared")
            return
    for t in targets:
        try:
            shutil.rmtree(t) if t.is_dir() else t.unlink()
        except OSError as e:
            _fail(f"cannot delete {t}: {e.strerror or e}")
    click.echo(f"cleared {names}: {human(size)} freed")
