"""`llmqgen export CHECKPOINT OUT_DIR`: a training checkpoint -> a Hugging Face model directory."""
from __future__ import annotations

import sys
from pathlib import Path

import click
import ml_dtypes
import numpy as np

from ..cliargs import finite_number
from .hf import HFCheckpointError, check_export_folder, export_hf
from .safetensors import SafetensorsError
from .store import CheckpointError, read_checkpoint

_DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f32": np.dtype("<f4"), "f16": np.dtype("<f2")}


@click.command("export")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--step", default="latest", show_default=True,
              help="Which checkpoint of a run: latest (the newest intact one) or a step number.")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default="bf16", show_default=True)
@click.option("--shard-size", default=5.0, show_default=True, type=float, callback=finite_number(0, inclusive=False, what="a positive number of GiB, e.g. 5"),
              help="GiB per safetensors file; larger models get an index.")
@click.option("--force", is_flag=True,
              help="Write into OUT_DIR although it holds files that no llmqgen export wrote: its model "
                   "safetensors files and config.json are replaced, other files kept.")
def export(checkpoint, out_dir, step, dtype, shard_size, force) -> None:
    """Write CHECKPOINT as an HF model in OUT_DIR. CHECKPOINT: a run directory (runs/<plan>), its
    checkpoints/ directory, or one step-NNNNNN directory written by `llmqgen run`. OUT_DIR is new, empty, or
    an earlier export's (whose files this one replaces; llmqgen-export.json names them); else --force."""
    try:
        check_export_folder(Path(out_dir), force)     # before the checkpoint is read and hashed
        ck = read_checkpoint(checkpoint, step)
        spec = ck.plan().model
        files = export_hf(ck.params(), spec, out_dir, shard_bytes=int(shard_size * (1 << 30)),
                          dtype=_DTYPES[dtype], force=force)
    except (CheckpointError, HFCheckpointError, SafetensorsError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:        # reading the checkpoint (its files are memory-mapped) or writing the export
        file = Path(e.filename).resolve() if e.filename else None
        out = Path(out_dir).resolve()
        what = f"cannot read {e.filename}" if file and out != file and out not in file.parents else f"cannot write {out_dir}"
        click.echo(f"error: {what}: {e.strerror or e}", err=True)
        sys.exit(2)
    click.echo(f"exported {spec.name} at step {ck.step} from {ck.path} ({dtype}, {len(files)} files) "
               f"-> {out_dir}")
