"""`llmqgen data ...`: the click group the top-level CLI registers as `data`."""
from __future__ import annotations

import sys

import click

from .prepare import PrepareError, prepare
from .shards import ShardError
from .tokenizer import TokenizerError


@click.group("data")
def data() -> None:
    """Prepare token datasets for training."""


@data.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Dataset directory to write (shards + manifest.json).")
@click.option("--tokenizer", default="qwen2.5", show_default=True,
              help="qwen2.5, a tokenizer.json (or its directory) or a *.tiktoken BPE file.")
@click.option("--field", default="text", show_default=True,
              help="JSONL key / Parquet column holding the text.")
@click.option("--eval-fraction", default=0.01, show_default=True, type=float,
              help="Share of documents held out for evaluation (chosen by a hash of their index).")
@click.option("--shard-tokens", default=100_000_000, show_default=True, type=int,
              help="Tokens per shard file.")
@click.option("--workers", default=None, type=int,
              help="Tokenizer processes (default: CPU count, at most 8). Output does not depend on it.")
@click.option("--max-tokens", default=None, type=int,
              help="Stop at the end of the document that reaches this many tokens: documents are kept "
                   "whole, so one long document can take the total far past it.")
@click.option("--encoding", default="utf-8", show_default=True,
              help="How text and JSONL files are decoded, strictly: a codec (utf-8, latin-1, "
                   "cp1252, utf-16...) or auto (by byte-order mark: UTF-16/UTF-32/UTF-8, else UTF-8).")
@click.option("--skip-bad-files", is_flag=True,
              help="Leave out files that do not decode or are binary, with a warning naming each "
                   "(default: stop at the first).")
@click.option("--force", is_flag=True, help="Overwrite a dataset already in --out.")
@click.option("--quiet", is_flag=True, help="No progress display.")
def prepare_cmd(inputs, out, tokenizer, field, eval_fraction, shard_tokens, workers, max_tokens,
                encoding, skip_bad_files, force, quiet) -> None:
    """Tokenize text files, directories, JSONL or Parquet INPUTS into a dataset directory. A directory
    gives the files under it with a known suffix, leaving out hidden files and folders (.git, .venv);
    a file given more than once is read once."""
    try:
        manifest, stats = prepare(inputs, out, tokenizer=tokenizer, field=field,
                                  eval_fraction=eval_fraction, shard_tokens=shard_tokens,
                                  workers=workers, max_tokens=max_tokens, progress=not quiet,
                                  force=force, encoding=encoding, skip_bad_files=skip_bad_files)
    except (PrepareError, ShardError, TokenizerError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:        # reading an input is a PrepareError: what is left is writing the dataset
        click.echo(f"error: cannot write {out}: {e.strerror or e}", err=True)
        sys.exit(2)
    click.echo(stats.summary())
    click.echo(f"train: {manifest.tokens('train'):,} tokens, eval: {manifest.tokens('eval'):,} "
               f"tokens, tokenizer {manifest.tokenizer_id} -> {out}")
