"""The `llmqgen` command line: plan, build, and the catalogs; data and export come from their packages.

The library reports through `logging` (a logger per module, under "llmqgen"); every command prints
those records through one handler, `terminal_logging`: plain messages on stdout, warnings on stderr as
"warning: ...", and under a launcher (torchrun, mpirun, srun) only rank 0 prints them.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .cliargs import finite_number
from .plan import calibration as K

# User plans go to a folder of the current directory (or $LLMQGEN_PLANS_DIR, or `plan --out`); the
# repository's plans/ holds the checked-in examples only (the compile tests build every one of them).
PLANS_DIR = Path("llmqgen-plans")
PLANS_ENV = "LLMQGEN_PLANS_DIR"

logger = logging.getLogger(__name__)


class _TerminalHandler(logging.Handler):
    """llmqgen's log records as the command line prints them: INFO on stdout as the bare message,
    WARNING and above on stderr prefixed "warning: " / "error: "; on a launcher's other ranks only
    errors (so that a job prints once). click.echo finds the current stdout/stderr at each record."""

    def __init__(self, rank_zero: bool):
        super().__init__(logging.INFO)
        self.rank_zero = rank_zero

    def emit(self, record: logging.LogRecord) -> None:
        if not self.rank_zero and record.levelno < logging.ERROR:
            return
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            message = f"{'error' if record.levelno >= logging.ERROR else 'warning'}: {message}"
        click.echo(message, err=record.levelno >= logging.WARNING)


@contextmanager
def terminal_logging():
    """Print llmqgen's INFO and higher records with `_TerminalHandler` (and only there: not also through
    handlers some imported library put on the root logger) while in the block; each command of `main`
    runs in one."""
    from .runtime.dist import is_rank_zero
    top = logging.getLogger("llmqgen")
    handler, saved = _TerminalHandler(is_rank_zero()), (top.level, top.propagate)
    top.addHandler(handler)
    top.setLevel(logging.INFO)
    top.propagate = False
    try:
        yield
    finally:
        top.removeHandler(handler)
        top.setLevel(saved[0])
        top.propagate = saved[1]


def plans_dir() -> Path:
    """Where `plan` and `train` write plans and `build`/`run` look for the newest one."""
    env = os.environ.get(PLANS_ENV, "").strip()
    return Path(env).expanduser() if env else PLANS_DIR


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    try:
        return int(text)
    except ValueError:
        return text


def _given(*names: str) -> list[str]:
    """Those of the current command's parameters `names` that the command line gave, as options (--model)."""
    ctx = click.get_current_context()
    return [p.opts[0] for p in ctx.command.params if p.name in names and ctx.get_parameter_source(p.name)
            not in (click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)]


def _refuse_with(option: str, does: str, *names: str) -> None:
    """`option` given with options it would silently ignore (`names`, where the command line gave them):
    one `error:` line naming them."""
    given = _given(*names)
    if given:
        _fail(f"{option} and {', '.join(given)} conflict: {option} {does}; give one or the other")


def _plan_pins(items: tuple[str, ...], **options) -> dict:
    """The --set pins, checked against the options (micro_batch, seq_len) that the command line gave for
    the same inputs: an input given twice must agree (solver.check_agrees), else one `error:` line."""
    from .plan.solver import check_agrees, check_pins
    keys = {"micro_batch": "batch.micro_batch", "seq_len": "batch.seq_len"}
    pins: dict = {}
    typed: dict[str, str] = {}
    try:
        for item in items:
            if "=" not in item:
                raise click.BadParameter(f"{item!r}: expected KEY=VALUE, e.g. recompute.ffn=true", param_hint="--set")
            key, value = (x.strip() for x in item.split("=", 1))
            check_agrees(f"--set {item.strip()}", _parse_value(value), key, pins)
            pins[key], typed[key] = _parse_value(value), value
        pins = check_pins(pins, typed)          # here, so that an error repeats the value as typed
        for name, value in options.items():
            if _given(name):
                check_agrees(f"{_given(name)[0]} {value}", value, keys[name], pins)
    except ValueError as e:
        _fail(str(e))
    return pins


def _inventory(gpus: str, host_mem: Optional[str]):
    """Named inventories plan for a machine that may not be this one: unless --host-mem says
    otherwise, assume 128 GiB of host RAM per GPU (or this machine's, if larger)."""
    from .hardware.host import detect_host_memory
    from .hardware.inventory import parse_inventory

    inv = parse_inventory(gpus, host_mem)
    if host_mem is None and gpus.strip().lower() != "auto":
        assumed = max(detect_host_memory(), 128 * K.GiB * inv.count)
        inv = inv.model_copy(update={"host_mem_bytes": assumed, "host_mem_source": "assumed"})
    return inv


def _inventory_here(gpus: str, host_mem: Optional[str]):
    """`_inventory` for a command that runs the plan on this machine (train, bench): when --gpus is left to
    detection and there is no driver, what is missing is the GPU to run on, not a name for one."""
    from .hardware.host import NoDriverError
    try:
        return _inventory(gpus, host_mem)
    except NoDriverError:
        _fail(NO_DRIVER_RUNTIME)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _message(e: Exception) -> str:
    """An exception as the one line `_fail` prints (pydantic's multi-line errors summarised)."""
    from pydantic import ValidationError
    if isinstance(e, ValidationError):
        from .plan.schema import validation_summary
        return f"invalid plan input: {validation_summary(e)}"
    return str(e)


def _load_plan(path: Path, show: bool = False):
    """A plan file, or one line saying what the file is instead and what to do. An estimate made for
    other inputs (the file edited by hand) is refused where it would be shown (`show`), else a warning:
    the program is made from the inputs, which stand."""
    from .plan.memory import estimate_is_current
    from .plan.schema import PlanFileError, load_plan
    try:
        p = load_plan(path)
    except PlanFileError as e:
        _fail(str(e))
    if not estimate_is_current(p):
        stale = (f"{path}: its estimate does not match its inputs (the file was edited, or another llmqgen "
                 f"version made it): re-plan with `llmqgen plan`")
        if show:
            _fail(stale)
        logger.warning(stale)
    if p.estimate is not None:      # an inventory edited below what the plan needs (GPU or host memory)
        from .hardware.inventory import human_bytes
        from .plan.solver import usable_device, usable_host
        for need, have, what in ((p.estimate.device_bytes, usable_device(p.inventory), "per GPU"),
                                 (p.estimate.host_bytes, usable_host(p.inventory), "of pinned host RAM")):
            if need > have:
                _fail(f"{path}: the plan needs {human_bytes(need)} {what}, its inventory ({p.inventory.label}) "
                      f"has {human_bytes(have)} usable (the file was edited?): re-plan with `llmqgen plan`")
    return p


NO_DRIVER_RUNTIME = "no NVIDIA driver found (libcuda): run on a machine with an NVIDIA GPU and driver"


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def _missing_runtime(e: ImportError) -> None:
    """The GPU runtime did not import: without a driver that is what to say (the extra would not help
    on a machine without a GPU), else which extra to install."""
    _fail(NO_DRIVER_RUNTIME if not _driver_present() else
          f"{e}: the GPU runtime needs its extra: pip install 'llmqgen[gpu]'")


@contextmanager
def _gpu_runtime():
    """Around the first use of the GPU runtime: cuda-bindings and nvmath load libcuda and the CUDA
    libraries on first call (cuda.pathfinder's DynamicLibNotFoundError); say so in one line."""
    try:
        yield
    except Exception as e:
        kinds = {c.__name__ for c in type(e).__mro__}
        text = str(e)
        if "DynamicLibNotFoundError" in kinds:
            if "driver library" in text or "libcuda" in text or '"cuda"' in text:
                _fail(NO_DRIVER_RUNTIME)
            _fail(f"a CUDA library of the GPU runtime was not found ({text.strip()}): reinstall it with "
                  f"pip install 'llmqgen[gpu]'")
        if "CudaError" in kinds and "CUDA_ERROR_NO_DEVICE" in text:
            _fail("the NVIDIA driver sees no GPU (CUDA_ERROR_NO_DEVICE): check CUDA_VISIBLE_DEVICES")
        raise


class _OneLineErrors(click.Group):
    """click's own refusals (a missing file, a number out of range, an unknown option) as the one
    `error:` line every other refusal is, naming the help to read, instead of click's usage block."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError as e:      # `llmqgen` alone: the help, as click prints it
            click.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            click.echo(f"error: {e.format_message()}{see}", err=True)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)      # an int: click's own exit (--help, --version)


@click.group(cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmqgen")
@click.pass_context
def main(ctx):
    """llmqgen: plan, generate and compile FP8 training programs for Llama/Qwen models."""
    ctx.with_resource(terminal_logging())


def _solve_options(gpus: str):
    """The options `plan` and `train` solve a plan from (`gpus`: the --gpus default)."""
    opts = [
        click.option("--model", "model_name", default="0.5b", show_default=True,
                     help="Catalog name (qwen2.5-7b, llama3.1-8b, 32b...) or a local Hugging Face model directory."),
        click.option("--gpus", default=gpus, show_default=True, help="GPUs, e.g. 4x4090, 1xH200, or auto (NVML)."),
        click.option("--host-mem", default=None,
                     help="Host RAM, e.g. 128G (default: detected for auto, else assumed)."),
        click.option("--dtype", type=click.Choice(["e4m3", "fp8", "bf16"]), default=None,
                     help="Matmul precision (default: e4m3 where the GPU has FP8 tensor cores)."),
        click.option("--seq-len", type=click.IntRange(min=16), default=1024, show_default=True),
        click.option("--tokens-per-step", type=click.IntRange(min=1), default=524288, show_default=True,
                     help="Tokens per optimizer step over all GPUs."),
    ]
    return lambda f: _with_options(f, opts)


def _with_options(f, opts: list):
    """`f` with click options `opts`, shown in this order in --help."""
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@_solve_options("1xH200")
@click.option("--micro-batch", type=click.IntRange(min=1), default=None,
              help="Pin the sequences per GPU per micro-step.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Pin any plan input, e.g. --set recompute.ffn=true --set offload.residual=true "
                   "--set precision.scaling=delayed.")
@click.option("--name", default=None, help="Plan name (default: <model>-<dtype>-<gpus>).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Where the plan file goes (default: ${PLANS_ENV}, else ./{PLANS_DIR}/).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan JSON instead of the tables.")
@click.option("--show", "show_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Re-print a saved plan and exit.")
def plan(model_name, gpus, host_mem, dtype, seq_len, tokens_per_step, micro_batch, sets, name, out_dir,
         as_json, show_path):
    """Solve a plan: what fits where, and how fast it will be. Writes llmqgen-plans/<name>.json."""
    from .plan.show import render_plan
    from .plan.solver import NoFitError, solve

    if show_path is not None:
        _refuse_with("--show", "re-prints the saved plan as it is", "model_name", "gpus", "host_mem", "dtype",
                     "seq_len", "tokens_per_step", "micro_batch", "sets", "name", "out_dir")
        p = _load_plan(show_path, show=True)
        try:
            click.echo(p.to_json() if as_json else render_plan(p, str(show_path), written=False))
        except ValueError as e:
            _fail(f"{show_path}: {e}")
        return
    from .models.catalog import resolve_model

    pins = _plan_pins(sets, micro_batch=micro_batch, seq_len=seq_len)
    if micro_batch is not None:
        pins["batch.micro_batch"] = micro_batch
    try:
        model = resolve_model(model_name)
        inv = _inventory(gpus, host_mem)
        p = solve(model, inv, seq_len=seq_len, tokens_per_step=tokens_per_step,
                  dtype="e4m3" if dtype == "fp8" else dtype, pins=pins, name=name)
    except NoFitError as e:
        _fail(str(e))
    except ValueError as e:             # pydantic's ValidationError is a ValueError too
        message = _message(e)
        ctx = click.get_current_context()
        if message.startswith("--tokens-per-step") and \
                ctx.get_parameter_source("tokens_per_step") == click.core.ParameterSource.DEFAULT:
            message = "the default " + message      # the user never typed it: say where it came from
        _fail(message)
    where = "choose another --out" if out_dir else (f"set ${PLANS_ENV} to a writable folder, or pass --out"
                                                    if os.environ.get(PLANS_ENV) else "pass --out")
    out_dir = out_dir or plans_dir()
    path = out_dir / f"{p.name}.json"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(p.to_json())
    except OSError as e:
        _fail(f"cannot write the plan to {path}: {e.strerror or e} ({where})")
    click.echo(p.to_json() if as_json else render_plan(p, str(path)))


@main.command()
@click.option("--detect", is_flag=True, help="Also ask the driver (NVML) which GPUs this machine has.")
def gpus(detect):
    """List the GPU catalog (dense FP32-accumulate tensor rates), and detected GPUs with --detect."""
    from .hardware.catalog import GPUS

    click.echo(f"{'name':<10} {'GPU':<36} {'arch':<7} {'memory':>9} {'BF16':>6} {'FP8':>6} {'GB/s':>6} "
               f"{'host link':<10} {'NVLink':>7} P2P")
    seen = set()
    for g in GPUS.values():
        if g.name in seen:
            continue
        seen.add(g.name)
        fp8 = f"{g.fp8_tflops:.0f}" if g.fp8_tflops else "-"
        click.echo(f"{g.name:<10} {g.display_name[:36]:<36} {g.arch:<7} {g.memory_bytes / K.GiB:>5.1f} GiB "
                   f"{g.bf16_tflops:>6.0f} {fp8:>6} {g.mem_bandwidth_gbs:>6.0f} "
                   f"PCIe{g.pcie_gen} x{g.pcie_lanes:<3} {g.nvlink_gbs:>7.0f} {'yes' if g.peer_access else 'no'}")
    click.echo("Rates are dense TFLOP/s with FP32 accumulation. Inventories: --gpus 4x4090, 1xH200, auto.")
    if detect:
        from .hardware.catalog import match_nvml_name
        from .hardware.host import NoDriverError, detect_host_memory, detected_gpus
        try:
            found = detected_gpus()
        except NoDriverError:
            _fail("no NVIDIA driver found (NVML): --detect needs one. The catalog above needs none; to plan "
                  "for GPUs that are not here, name them: llmqgen plan --gpus 1x4090")
        if not found:
            _fail("the driver reports no GPU visible to this process: check CUDA_VISIBLE_DEVICES")
        host = f"host RAM {detect_host_memory() / K.GiB:.0f} GiB"
        names = list(dict.fromkeys(g.name for g in found))
        for name in names:
            n = sum(g.name == name for g in found)
            try:
                use = f"plan with --gpus {n}x{match_nvml_name(name).name} (or auto)"
            except ValueError:
                use = "not in the catalog: plan with --gpus COUNTxGPU naming the catalog GPU it performs like"
            click.echo(f"detected: {n} x {name}, {host}; {use}")
        if len(names) > 1:
            click.echo("note: llmqgen plans for one GPU model at a time: choose them with CUDA_VISIBLE_DEVICES")


@main.command()
def models():
    """List the model catalog (size aliases 0.5b ... 72b name Qwen2.5)."""
    from .models.catalog import list_models

    click.echo(f"{'name':<16} {'arch':<6} {'params':>8} {'layers':>6} {'hidden':>6} {'ffn':>6} {'heads':>7} "
               f"{'head_dim':>8} {'vocab':>7} tied")
    for m in list_models():
        click.echo(f"{m.name:<16} {m.architecture:<6} {m.num_params() / 1e9:>7.2f}B {m.num_layers:>6} "
                   f"{m.hidden_size:>6} {m.intermediate_size:>6} {m.num_heads:>3}/{m.num_kv_heads:<3} "
                   f"{m.head_dim:>8} {m.vocab_size:>7} {'yes' if m.tie_embeddings else 'no'}")
    click.echo("Any local Hugging Face directory with a Qwen2/Qwen3/Llama config.json works too: --model PATH.")


def _newest_plan() -> Path:
    where = plans_dir()
    plans = sorted(where.glob("*.json"), key=lambda p: p.stat().st_mtime) if where.is_dir() else []
    if not plans:
        # name --model/--gpus only where the command has them (build, bench; not run)
        solves = {"model_name", "gpus"} <= {p.name for p in click.get_current_context().command.params}
        _fail(f"no plan given and none in {where}/: run `llmqgen plan --model ... --gpus ...` first, "
              f"or pass --plan FILE (e.g. an example in plans/)" + (" or --model/--gpus" if solves else ""))
    return plans[-1]


@main.command()
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A plan file (default: the newest in llmqgen-plans/ or $LLMQGEN_PLANS_DIR, unless --model/--gpus "
                   "are given).")
@click.option("--model", "model_name", default=None, help="Solve a plan for this model first (with --gpus).")
@click.option("--gpus", default=None, help="GPUs for --model, e.g. 1x4090.")
@click.option("--arch", default=None, help="Target, e.g. sm_89, sm_90, sm_90a, sm_120 (default: the plan's GPU).")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path), default=Path("build"),
              show_default=True)
def build(plan_path, model_name, gpus, arch, out_root):
    """Render the plan's CUDA program and compile it with NVRTC into build/<uri>/."""
    from .compile.build_folder import build_locked
    from .compile.nvrtc import CompileError, NvrtcUnavailable

    if plan_path is not None:
        _refuse_with("--plan", "builds the plan in the file, --model/--gpus solve a new one", "model_name", "gpus")
    if model_name or gpus:
        from .models.catalog import resolve_model
        from .plan.solver import NoFitError, solve
        try:
            p = solve(resolve_model(model_name or "0.5b"), _inventory(gpus or "1xH200", None))
        except (NoFitError, ValueError) as e:
            _fail(str(e))
        source = f"solved for --model {model_name or '0.5b'} --gpus {gpus or '1xH200'}, saved as {_save_plan(p)}"
    else:
        plan_path = plan_path or _newest_plan()
        p = _load_plan(plan_path)
        source = str(plan_path)
    from .codegen.context import check_arch, parse_arch
    if arch:
        try:
            parse_arch(arch)
        except ValueError as e:
            _fail(str(e))
    click.echo(f"building {p.name} ({source}) for {arch or p.inventory.gpu.arch} ...")
    if arch:
        try:
            check_arch(arch, p.inventory.gpu)
        except ValueError as e:
            click.echo(f"note: {e} (compiling anyway, as a check)", err=True)
    try:
        r = build_locked(p, arch, out_root=out_root)
    except (CompileError, NvrtcUnavailable, ValueError) as e:
        _fail(str(e))
    except OSError as e:
        from .compile.nvrtc import cache_root
        root = cache_root()
        if e.filename and Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(root)):
            _fail(f"cannot write the cache under {root}: {e.strerror or e} (set LLMQGEN_CACHE_DIR to a "
                  f"writable folder)")
        _fail(f"cannot write the build under {out_root}: {e.strerror or e} (choose another --out)")
    how = "cache hit" if r.cache_hit else f"compiled in {r.compile_seconds:.1f} s"
    click.echo(f"program  {r.path}/program.cu")
    click.echo(f"cubin    {r.cubin_path} ({r.cubin_bytes / 1024:.0f} KiB, {how})")
    if r.spills:
        click.echo(f"warning: kernels that spill registers: {', '.join(r.spills)}", err=True)


def _plan_from(plan_path: Optional[Path], model_name: Optional[str], gpus: Optional[str]):
    """A plan from --plan, or solved from --model/--gpus, or the newest in plans_dir()."""
    if plan_path is not None:
        _refuse_with("--plan", "runs the plan in the file, --model/--gpus solve a new one", "model_name", "gpus")
    if model_name or gpus:
        from .models.catalog import resolve_model
        from .plan.solver import NoFitError, solve
        try:
            return solve(resolve_model(model_name or "0.5b"), _inventory_here(gpus or "auto", None))
        except (NoFitError, ValueError) as e:
            _fail(str(e))
    return _load_plan(plan_path or _newest_plan())


@main.command()
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None)
@click.option("--model", "model_name", default=None, help="Solve a plan for this model (with --gpus, default auto).")
@click.option("--gpus", default=None)
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Timed optimizer steps.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True, help="Untimed steps first.")
@click.option("--out", "out_root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench/results"), show_default=True)
@click.option("--devices", default=None, help="GPU of each rank, e.g. 0,0 to run a 2-GPU plan's two ranks on "
              "GPU 0 (tests the collectives and host-staged transfer rates, not multi-GPU speed).")
@click.option("--profile", is_flag=True, help="Then one eager step timed per operation: GPU time and launches "
              "per kernel family and schedule phase, and the GEMM+attention (floor) share; into the result too.")
def bench(plan_path, model_name, gpus, steps, warmup, out_root, devices, profile):
    """Run optimizer steps of a plan on synthetic tokens; write bench/results/<gpu>-<plan>.json."""
    p = _plan_from(plan_path, model_name, gpus)
    ranks = None
    if devices:
        try:
            ranks = [int(d) for d in devices.split(",")]
        except ValueError:
            _fail(f"--devices {devices!r}: give one GPU index per rank, comma-separated, e.g. --devices 0,0")
        if min(ranks) < 0:
            _fail(f"--devices {devices!r}: GPU indices count from 0, e.g. --devices {','.join(['0'] * p.num_gpus)}")
    try:        # after the inputs' checks: without a GPU the runtime's import fails
        from .runtime.bench import run_bench
    except ImportError as e:
        _missing_runtime(e)
    logger.info(f"bench {p.name}: {warmup} warm-up + {steps} timed steps of {p.tokens_per_step:,} tokens")
    try:
        with _gpu_runtime():
            run_bench(p, steps=steps, warmup=warmup, out_root=out_root, devices=ranks, profile=profile)
    except (NotImplementedError, ValueError) as e:
        _fail(str(e))


_not_negative = finite_number(0, inclusive=True, what="a finite number >= 0")


def _run_options(f):
    """The options `run` and `train` share (the training loop's)."""
    opts = [
        click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="A dataset from `llmqgen data prepare` (default: the embedded corpus; on --resume, the run's own)."),
        click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True, help="Optimizer steps."),
        click.option("--lr", type=float, default=3e-4, show_default=True, callback=_not_negative,
                     help="Peak learning rate."),
        click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True),
        click.option("--schedule", type=click.Choice(["cosine", "linear", "wsd", "constant"]), default="cosine",
                     show_default=True),
        click.option("--weight-decay", type=float, default=0.1, show_default=True, callback=_not_negative,
                     help="AdamW weight decay (matrices and embeddings; not norms and biases)."),
        click.option("--eval-every", type=click.IntRange(min=0), default=0, help="Evaluate every N steps (0: never)."),
        click.option("--checkpoint-every", type=click.IntRange(min=0), default=0,
                     help="Checkpoint every N steps (and at the end, and on Ctrl-C)."),
        click.option("--checkpoint-minutes", type=float, default=60.0, show_default=True, callback=_not_negative,
                     help="Also checkpoint once this many minutes of wall time have passed since the last "
                          "checkpoint (checked after each step; 0: only by --checkpoint-every)."),
        click.option("--keep-last", type=click.IntRange(min=0), default=3, show_default=True,
                     help="Checkpoints kept in the run directory: the newest N, an older one deleted as a new "
                          "one is written (0: keep all). A resumed run keeps its saved --keep-last, "
                          "--checkpoint-every and --checkpoint-minutes unless they are given again."),
        click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Run directory (default: runs/<plan name>); a new run refuses one that holds a run already "
                          "(checkpoints, log.jsonl): resume it, or name another."),
        click.option("--resume", default=None,
                     help="Resume from a checkpoint of the run directory: latest (the newest intact one) or a "
                          "step. The run keeps the settings saved in it (steps, LR, schedule, ...); --steps "
                          "beyond a finished run's end extends it at its final LR."),
        click.option("--change", "change", multiple=True, metavar="SETTING[,SETTING]",
                     help="With --resume: apply these options although they differ from the saved run "
                          "(steps, lr, warmup, schedule, weight-decay); each change is printed and logged."),
        click.option("--max-bad-steps", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Steps in a row with a non-finite loss or gradient norm (each skipped, no update) "
                          "before the run checkpoints and stops."),
        click.option("--init-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
                     help="Start from a local Hugging Face model directory instead of random weights."),
        click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True),
    ]
    return _with_options(f, opts)


def _check_data(data, spec) -> None:
    """The dataset's token ids must fit the model's vocabulary: said before planning or any GPU work."""
    from .data.shards import check_dataset, check_vocab
    try:
        if data is None:        # the embedded corpus: known without preparing it
            from .data.tokenizer import load_tokenizer
            tok = load_tokenizer("qwen2.5")
            check_vocab(tok.identity, tok.vocab_size, spec)
        else:
            check_dataset(data, spec)
    except ValueError as e:
        _fail(str(e))


def _train(p, data, steps, lr, warmup, schedule, weight_decay, eval_every, checkpoint_every, checkpoint_minutes,
           keep_last, out_dir, resume, change, max_bad_steps, init_from, seed, solved=False):
    """Check the run's inputs (each refusal one `error:` line), then train with plan `p`; `solved`: `p` was
    solved by this command (train), saved to plans_dir() once the inputs are checked."""
    if change and not resume:
        _fail(f"--change {','.join(change)} changes a resumed run's saved settings: add --resume, or leave it out")
    if init_from and resume:
        _fail("--init-from and --resume conflict: a resumed run continues from its checkpoint's weights; give one "
              "of them")
    if data is not None or not resume:  # the inputs first: without a GPU the runtime's import fails
        _check_data(data, p.model)      # (a resumed run's own dataset is checked once it is read)
    out_dir = out_dir or Path("runs") / p.name
    from .runtime.rundir import CHECKPOINTS, check_new_run, check_resume_step
    if resume:                          # the checkpoint exists (its hashes are checked when it is read)
        from .checkpoint.store import CheckpointError, resolve
        try:
            check_resume_step(out_dir, resolve(out_dir / CHECKPOINTS, int(resume) if resume.isdigit() else resume,
                                               deep=False))
        except (CheckpointError, ValueError) as e:
            _fail(str(e))
    else:                               # a new run: not over an earlier one
        try:
            check_new_run(out_dir)
        except ValueError as e:
            _fail(str(e))
    if solved:
        _save_plan(p)
    try:
        from .runtime.run import RunConfig, train
    except ImportError as e:
        _missing_runtime(e)
    from click.core import ParameterSource
    ctx = click.get_current_context(silent=True)

    def given(name, value):     # None: not on the command line (a new run's default, a resumed run's saved value)
        src = ctx.get_parameter_source(name) if ctx else None
        return None if src in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP) else value
    if data is None and not resume:     # a resumed run reads its own dataset (runtime/run.py: run_dataset)
        from .data.corpus import default_corpus
        logger.info("no --data given: training on the embedded default corpus")
        data = default_corpus()         # says what the corpus is
    changes = tuple(c.strip().replace("-", "_") for item in change for c in item.split(",") if c.strip())
    cfg = RunConfig(data=data, out=out_dir, steps=given("steps", steps),
                    lr=given("lr", lr), warmup=given("warmup", warmup), schedule=given("schedule", schedule),
                    weight_decay=given("weight_decay", weight_decay), eval_every=eval_every,
                    checkpoint_every=given("checkpoint_every", checkpoint_every),
                    checkpoint_minutes=given("checkpoint_minutes", checkpoint_minutes),
                    keep_last=given("keep_last", keep_last),
                    seed=given("seed", seed), resume=resume, change=changes,
                    max_bad_steps=max_bad_steps, init_from=init_from)
    try:
        with _gpu_runtime():
            train(p, cfg)     # train logs the run's header
    except (NotImplementedError, ValueError) as e:
        _fail(str(e))


@main.command()
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A plan file (default: the newest in llmqgen-plans/ or $LLMQGEN_PLANS_DIR).")
@_run_options
def run(plan_path, **kw):
    """Train with a plan's program: log, checkpoints, HF export at the end (Ctrl-C stops after saving)."""
    _train(_plan_from(plan_path, None, None), **kw)


@main.command("train")
@_solve_options("auto")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Pin any plan input, as for `llmqgen plan`.")
@_run_options
def train_cmd(model_name, gpus, host_mem, dtype, seq_len, tokens_per_step, sets, **kw):
    """Plan + build + run in one go, with sensible defaults."""
    from .models.catalog import resolve_model
    from .plan.solver import NoFitError, solve
    try:
        spec = resolve_model(model_name)
    except ValueError as e:
        _fail(str(e))
    _check_data(kw["data"], spec)
    try:
        p = solve(spec, _inventory_here(gpus, host_mem), seq_len=seq_len,
                  tokens_per_step=tokens_per_step, dtype="e4m3" if dtype == "fp8" else dtype,
                  pins=_plan_pins(sets, seq_len=seq_len))
    except (NoFitError, ValueError) as e:
        _fail(str(e))
    _train(p, **kw, solved=True)


def _save_plan(p) -> Path:
    """A plan solved by another command than `plan` into plans_dir(), where `run`, `bench` and `build` find
    the newest."""
    path = plans_dir() / f"{p.name}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(p.to_json())
    except OSError as e:
        _fail(f"cannot write the plan to {path}: {e.strerror or e} (set {PLANS_ENV} to another folder)")
    return path


def _register_subcommands() -> None:
    from .cachecmd import cache
    from .checkpoint.cli import export
    from .data.cli import data

    main.add_command(cache)
    main.add_command(data)
    main.add_command(export)


_register_subcommands()

if __name__ == "__main__":
    main()
