"""Test harness for generated kernels: a tiny plan, its program built for this GPU, launches from torch.

    plan = small_plan("qwen3", fp8=True, T=256)        # pure Python, works without a GPU
    prog = build_program(plan)                         # render + NVRTC for this GPU + module load
    prog.launch("llmq_rmsnorm_fwd", out, x, w, 1e-6)   # torch CUDA tensors, ints, floats; synchronizes

Kernels run on torch's current stream in the primary context that torch also uses, so tensors
allocated by torch are valid kernel arguments. torch is imported lazily: small_plan works on CPU.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llmqgen.codegen.kernel import Kernel, kernel_from_json
from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.hardware.spec import Inventory
from llmqgen.models.spec import ModelSpec, RopeScaling
from llmqgen.plan.schema import Batch, Offload, Plan, Precision, Recompute, Sharding
from llmqgen.runtime import driver

# Each offload/streaming choice alone and the combinations the offload tests (CPU and GPU) run, as
# small_plan overrides: "streaming" is sharded weights on one GPU, fetched from host memory.
OFFLOAD_OPTIONS = {
    "master": dict(offload=Offload(master=True)),
    "adam_m": dict(offload=Offload(adam_m=True)),
    "adam_v": dict(offload=Offload(adam_v=True)),
    "residual": dict(offload=Offload(residual=True)),
    "quantized_weights": dict(offload=Offload(quantized_weights=True)),
    "gradients": dict(offload=Offload(gradients=True)),
    "recompute.block": dict(recompute=Recompute(block=True)),
    "attn_bwd_chunks": dict(attn_bwd_chunks=2),     # cuDNN's backward over half the micro-batch at a time
    "streaming": dict(sharding=Sharding.from_zero(3)),
    "block+residual": dict(recompute=Recompute(block=True), offload=Offload(residual=True)),
    "master+adam_m+adam_v": dict(offload=Offload(master=True, adam_m=True, adam_v=True)),
    "streaming+quantized_weights": dict(sharding=Sharding.from_zero(3), offload=Offload(quantized_weights=True)),
}

SMEM_DEFAULT_MAX = 48 * 1024  # above this a kernel must opt in to dynamic shared memory

# Short names of the tiny model's numbers -> (part of the plan, field).
_SHORT = {"C": ("model", "hidden_size"), "F": ("model", "intermediate_size"), "L": ("model", "num_layers"),
          "HQ": ("model", "num_heads"), "HKV": ("model", "num_kv_heads"), "HD": ("model", "head_dim"),
          "V": ("model", "vocab_size"), "B": ("batch", "micro_batch"), "T": ("batch", "seq_len")}

_ARCH_FLAGS = {  # what distinguishes the three families (Qwen2.5, Qwen3, Llama 3.x)
    "qwen2": dict(qkv_bias=True, qk_norm=False, tie_embeddings=True, rope_theta=1e6),
    "qwen3": dict(qkv_bias=False, qk_norm=True, tie_embeddings=True, rope_theta=1e6),
    "llama": dict(qkv_bias=False, qk_norm=False, tie_embeddings=False, rope_theta=5e5,
                  rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}


def small_plan(arch: str = "qwen2", fp8: bool = True, gpu: str = "h200", gpus: int = 1, **overrides) -> Plan:
    """A tiny model (C=256, F=512, HQ=4, HKV=2, HD=64, V=1024, L=2, B=2, T=128) as a Plan.

    Overrides: the short names above, any ModelSpec / Batch / Precision field, or any Plan field
    (recompute=Recompute(...), lm_head_chunks=2, ...)."""
    if arch not in _ARCH_FLAGS:
        raise ValueError(f"arch must be one of {sorted(_ARCH_FLAGS)}, not {arch!r}")
    parts = {"model": dict(name=f"tiny-{arch}", architecture=arch, hidden_size=256, intermediate_size=512,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=1024,
                           **_ARCH_FLAGS[arch]),
             "batch": dict(micro_batch=2, seq_len=128, grad_accum=1),
             "precision": dict(matmul="e4m3", gradient="e4m3") if fp8 else dict(matmul="bf16", gradient="bf16"),
             "plan": dict(name=f"tiny-{arch}-{'fp8' if fp8 else 'bf16'}")}
    fields = {"model": ModelSpec.model_fields, "batch": Batch.model_fields,
              "precision": Precision.model_fields, "plan": Plan.model_fields}
    for key, value in overrides.items():
        part, field = _SHORT.get(key, (next((p for p, f in fields.items() if key in f), None), key))
        if part is None:
            raise TypeError(f"small_plan: unknown override {key!r} (use {', '.join(_SHORT)} or a field of "
                            f"ModelSpec, Batch, Precision or Plan)")
        parts[part][field] = value
    gpu_spec = resolve_gpu(gpu)
    inventory = Inventory(gpu=gpu_spec, count=gpus, host_mem_bytes=64 << 30)
    return Plan(model=ModelSpec(**parts["model"]), inventory=inventory, batch=Batch(**parts["batch"]),
                precision=Precision(**parts["precision"]), **parts["plan"])


def gpu_unavailable_reason() -> str | None:
    """Why GPU tests cannot run here (asked of the driver, not torch), or None when they can."""
    try:
        n = driver.device_count()
    except Exception as e:  # noqa: BLE001 - no libcuda at all raises before any CUresult exists
        return f"no usable NVIDIA driver ({type(e).__name__}: {e})"
    return None if n > 0 else "the NVIDIA driver sees no GPU"


def current_device() -> driver.Device:
    """torch's current GPU, opened through the driver layer (the same primary context as torch)."""
    import torch

    torch.cuda.init()
    return driver.open_device(torch.cuda.current_device())


class KernelProgram:
    """A loaded CUBIN and its launch table (the rows of kernels.json)."""

    def __init__(self, cubin: bytes, kernels: list[Kernel]):
        self.device = current_device()
        self.module = driver.module_load(cubin)
        self.kernels = {k.name: k for k in kernels}
        self._funcs: dict[str, int] = {}
        self._smem_set: dict[str, int] = {}

    @classmethod
    def from_build_dir(cls, path: Path) -> "KernelProgram":
        path = Path(path)
        rows = json.loads((path / "kernels.json").read_text())
        return cls((path / "program.cubin").read_bytes(), [kernel_from_json(r) for r in rows])

    def func(self, name: str) -> int:
        if name not in self._funcs:
            if name not in self.kernels:
                raise KeyError(f"no kernel {name!r} in this program (has: {', '.join(sorted(self.kernels))})")
            self._funcs[name] = driver.function(self.module, name)
        return self._funcs[name]

    def launch(self, name: str, *args, grid=None, block=None, smem=None) -> None:
        """Launch on torch's current stream with Kernel.args-ordered arguments, then synchronize."""
        import torch

        func = self.func(name)  # raises a KeyError listing the program's kernels
        k = self.kernels[name]
        if len(args) != len(k.args):
            raise TypeError(f"{name} takes {len(k.args)} arguments "
                            f"({', '.join(f'{t} {n}' for n, t in k.args)}), got {len(args)}")
        values = []
        for (arg, ctype), a in zip(k.args, args):
            if isinstance(a, torch.Tensor):
                if not a.is_cuda:
                    raise TypeError(f"{name}: argument {arg} ({ctype}) is a CPU tensor: move it to the GPU")
                a = a.data_ptr()
            values.append(a)
        smem = k.smem if smem is None else smem
        if smem > SMEM_DEFAULT_MAX and self._smem_set.get(name, 0) < smem:
            driver.set_max_dynamic_smem(func, smem)
            self._smem_set[name] = smem
        stream = torch.cuda.current_stream().cuda_stream
        driver.launch(func, grid or k.grid, block or k.block, smem, stream, values, [t for _, t in k.args])
        driver.stream_synchronize(stream)  # raises CudaError naming the failure (e.g. an illegal address)


def build_program(plan: Plan, out_root: Path | None = None) -> KernelProgram:
    """Render and compile `plan`'s program for this GPU's architecture, and load it."""
    from llmqgen.compile.cache import build

    out_root = Path(out_root or Path(tempfile.gettempdir()) / "llmqgen-test-builds")
    result = build(plan, current_device().arch, out_root)
    return KernelProgram.from_build_dir(result.path)
