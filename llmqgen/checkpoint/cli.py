"""`llmqgen export CHECKPOINT OUT_DIR`: a training checkpoint -> a Hugging Face model directory."""
from __future__ import annotations

import json

import click
import ml_dtypes
import numpy as np

from ..models.hf_names import param_shapes
from ..models.spec import ModelSpec
from .hf import HFCheckpointError, export_hf
from .safetensors import SafetensorsError
from .store import CheckpointError, load_checkpoint

_DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f32": np.dtype("<f4"), "f16": np.dtype("<f2")}


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--step", default="latest", show_default=True,
              help="Which checkpoint of a run directory: latest or a step number.")
@click.option("--dtype", type=click.Choice(sorted(_DTYPES)), default="bf16", show_default=True)
@click.option("--shard-size", default=5.0, show_default=True, type=float,
              help="GiB per safetensors file; larger models get an index.")
def export(checkpoint, out_dir, step, dtype, shard_size) -> None:
    """Write CHECKPOINT (a step directory or a run's checkpoint root) as an HF model in OUT_DIR."""
    try:
        tensors, state, plan_json = load_checkpoint(checkpoint, step)
        model = json.loads(plan_json).get("model")
        if model is None:
            raise click.ClickException(f"{checkpoint}: plan.json names no model; cannot export")
        spec = ModelSpec.model_validate(model)
        weights = {n: tensors[n] for n in param_shapes(spec) if n in tensors}
        files = export_hf(weights, spec, out_dir, shard_bytes=int(shard_size * (1 << 30)),
                          dtype=_DTYPES[dtype])
    except (CheckpointError, HFCheckpointError, SafetensorsError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"exported {spec.name} at step {state.get('step')} ({dtype}, {len(files)} files) "
               f"-> {out_dir}")
