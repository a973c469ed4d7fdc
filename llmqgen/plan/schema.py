"""The plan: the single configuration that codegen and runtime consume.

Inputs (everything but `estimate`) define the plan's identity; `estimate` holds what the planner
derived from them (memory table, predicted speed, why each choice was made) and is never hashed.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from ..hardware.spec import Inventory
from ..models.spec import ModelSpec

SCHEMA_VERSION = 1

MatmulDtype = Literal["e4m3", "bf16"]
GradDtype = Literal["e4m3", "e5m2", "bf16"]
StateDtype = Literal["bf16", "fp32"]
Scaling = Literal["current", "delayed"]
HeadDtype = Literal["bf16", "fp8"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Precision(_Frozen):
    matmul: MatmulDtype = "e4m3"       # the four block linears (weights, inputs, activation grads)
    gradient: GradDtype = "e4m3"       # activation gradients entering FP8 backward matmuls
    master: StateDtype = "bf16"        # master weights (bf16 with stochastic rounding, or fp32)
    adam_m: StateDtype = "bf16"
    adam_v: StateDtype = "bf16"
    # FP8 scales of activations and their gradients: "current" (per tensor, from this micro-step's amax: an
    # amax pass before the bytes where no producer records one) or "delayed" (from the max of the last
    # `amax_history` micro-steps' amaxes, as Transformer Engine's DelayedScaling: producers write fp8 in one
    # pass and record the amax for later; values beyond the scale saturate). Weights: current scaling always.
    scaling: Scaling = "current"
    amax_history: StrictInt = Field(default=16, ge=1, le=1024)
    # The LM head's three GEMMs: "bf16" (the usual choice: DeepSeek-V3's FP8 recipe keeps the output head in
    # BF16) or "fp8": e4m3 input and weight, an e5m2 logit gradient whatever `gradient` says (its
    # probabilities reach far below e4m3's range), each scaled per tensor by its current amax (the logit
    # gradient by its exact bound, the loss's gradient scale: softmax minus one-hot lies in [-1, 1]). Twice the
    # tensor-core rate on the largest GEMMs of small models; tests/gpu's learning check measures its loss.
    lm_head: HeadDtype = "bf16"
    # FP8 forward GEMMs (block and FP8 head) accumulate in the tensor cores' own precision, without promoting
    # partial sums to fp32 (cuBLASLt's FAST_ACCUM; Transformer Engine's recipes do so for fprop, and keep
    # dgrad and wgrad precise, as here). Its algorithms are chosen by timing (runtime/gemm_search.py).
    fast_accum: StrictBool = False

    @model_validator(mode="after")
    def _grad_follows_matmul(self):
        if self.matmul == "bf16" and self.gradient != "bf16":
            if "gradient" in self.model_fields_set:     # asked for, not the e4m3 default: say why not
                raise ValueError(f"FP8 activation gradients ({self.gradient}) need FP8 (e4m3) matmuls: "
                                 f"drop the gradient pin or use e4m3 matmuls")
            object.__setattr__(self, "gradient", "bf16")
        if self.matmul == "e4m3" and self.gradient == "bf16":
            raise ValueError("FP8 matmuls need FP8 activation gradients: gradient must be e4m3 or e5m2")
        if self.matmul == "bf16" and self.scaling == "delayed":
            raise ValueError("delayed scaling is a recipe for FP8 matmuls: drop precision.scaling or use e4m3 matmuls")
        if self.matmul == "bf16" and self.fast_accum:
            raise ValueError("fast accumulation is a mode of FP8 matmuls: drop precision.fast_accum or use e4m3 matmuls "
                             "(--dtype e4m3)")
        if self.matmul == "bf16" and self.lm_head == "fp8":
            raise ValueError("an FP8 LM head needs FP8 (e4m3) matmuls: drop precision.lm_head or use e4m3 matmuls "
                             "(--dtype e4m3)")
        return self

    @property
    def delayed(self) -> bool:
        """FP8 with delayed scaling (the validator above keeps it off BF16 plans)."""
        return self.scaling == "delayed"

    @property
    def fp8_head(self) -> bool:
        """The LM head's GEMMs in FP8 (the validator above keeps it off BF16 plans)."""
        return self.lm_head == "fp8"


class Batch(_Frozen):
    micro_batch: StrictInt = Field(ge=1)     # sequences per GPU per micro-step
    seq_len: StrictInt = Field(ge=16)
    grad_accum: StrictInt = Field(ge=1)      # micro-steps per optimizer step


class Recompute(_Frozen):
    """Which forward activations are recomputed in backward instead of saved (LLMQ's flags).

    Implications (applied on construction, as LLMQ does): ffn -> swiglu; attention -> qkv;
    block -> everything (only each block's residual input is kept)."""

    swiglu: StrictBool = False      # SwiGLU output, from the saved gate/up product
    norm: StrictBool = False        # both RMSNorm outputs, from the saved residual
    ffn: StrictBool = False         # gate/up matmul + SwiGLU, from the (saved or recomputed) norm output
    qkv: StrictBool = False         # QKV matmul + RoPE, from the (saved or recomputed) norm output
    attention: StrictBool = False   # attention forward (output and LSE), from recomputed QKV
    block: StrictBool = False       # the whole block from its residual input

    @model_validator(mode="after")
    def _implications(self):
        set_ = lambda k: object.__setattr__(self, k, True)  # noqa: E731 - frozen model
        if self.block:
            for k in ("swiglu", "norm", "ffn", "qkv", "attention"):
                set_(k)
        if self.ffn:
            set_("swiglu")
        if self.attention:
            set_("qkv")
        return self

    def names(self) -> list[str]:
        return [k for k in ("swiglu", "norm", "ffn", "qkv", "attention", "block") if getattr(self, k)]


class Offload(_Frozen):
    """What lives in pinned host memory instead of the GPU (streamed over PCIe when used)."""

    master: StrictBool = False
    adam_m: StrictBool = False
    adam_v: StrictBool = False
    residual: StrictBool = False           # saved per-layer residuals (needed by backward)
    quantized_weights: StrictBool = False  # FP8/BF16 work copy of the block weights, streamed per layer
    gradients: StrictBool = False          # weight gradients (accumulated on host after each micro-step)

    def names(self) -> list[str]:
        return [k for k in type(self).model_fields if getattr(self, k)]


class Sharding(_Frozen):
    """ZeRO sharding over the GPUs. On one GPU, `weights` means streaming weights from host."""

    optimizer: StrictBool = False   # ZeRO-1: master + Adam m/v sharded
    gradients: StrictBool = False   # ZeRO-2: weight gradients reduce-scattered
    weights: StrictBool = False     # ZeRO-3: work weights all-gathered per layer

    @property
    def zero(self) -> int:
        return 3 if self.weights else 2 if self.gradients else 1 if self.optimizer else 0

    @classmethod
    def from_zero(cls, level: int) -> "Sharding":
        return cls(optimizer=level >= 1, gradients=level >= 2, weights=level >= 3)


class MemRow(_Frozen):
    """One allocation of the static layout; the runtime allocates exactly these rows."""

    name: str
    bytes: int                 # one instance, rounded up to the arena alignment
    count: int = 1             # instances (num_layers for per-layer rows)
    place: Literal["device", "host"]
    # persistent: lives for the whole run; per_layer: one instance per block, saved in forward for
    # backward; shared: scratch reused by every block; reserve: counted, never allocated by llmqgen
    # (the CUDA context and library handles take it)
    lifetime: Literal["persistent", "per_layer", "shared", "reserve"]
    dtype: str
    shape: tuple[int, ...]
    note: str = ""
    sharded: StrictBool = False      # this GPU's shard (shape (S,)) of a tensor split over the GPUs
    # device rows: bytes from the arena's base (plan/lifetimes.py packs rows whose lifetimes never
    # overlap into the same bytes); None in an unpacked table and for host and reserve rows
    offset: Optional[int] = None
    # packed rows: (first, last) operation of the step order (lifetimes.step_order) that touches them;
    # None: live for the whole step
    live: Optional[tuple[int, int]] = None

    @property
    def total(self) -> int:
        return self.bytes * self.count


class Candidate(_Frozen):
    """A runner-up: its choices in a line and why it lost."""

    summary: str
    step_ms: float
    tokens_per_s: float
    device_bytes: int
    why_not: str


class Estimate(_Frozen):
    memory: list[MemRow]
    device_bytes: int          # per GPU
    host_bytes: int            # whole machine
    step_ms: float             # one optimizer step
    tokens_per_s: float
    flops_per_token: float     # training FLOPs per token (6N + attention), for MFU
    sol_ms: float              # LLMQ's speed-of-light time of one step
    sol_pct: float
    mfu_pct: float             # BF16-equivalent model FLOP utilisation
    breakdown_ms: dict[str, float]
    reasons: dict[str, str]    # choice -> one line of why
    runners_up: list[Candidate] = []


class Plan(_Frozen):
    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema")
    name: str
    model: ModelSpec
    inventory: Inventory
    precision: Precision = Precision()
    batch: Batch
    recompute: Recompute = Recompute()
    offload: Offload = Offload()
    sharding: Sharding = Sharding()
    # counts are integers in a plan file, not true (pydantic's lax mode reads true as 1) or 2.0
    lm_head_chunks: StrictInt = Field(default=1, ge=1)
    attn_bwd_chunks: StrictInt = Field(default=1, ge=1)
    # copy_engine: one process drives every GPU of the machine, collectives are cuMemcpyAsync (peer
    # copies when peer_copies, else staged through pinned host memory); nccl: one process per GPU
    collectives: Literal["copy_engine", "nccl"] = "copy_engine"
    peer_copies: StrictBool = False
    cuda_graphs: StrictBool = True
    estimate: Optional[Estimate] = None

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _check(self):
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"plan schema {self.schema_version} is not supported by this llmqgen "
                             f"(expects {SCHEMA_VERSION}): re-run `llmqgen plan` to make a new one")
        check_plan_name(self.name)      # it names the run's folder (runs/<name>) and the plan's file
        if self.batch.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"seq_len {self.batch.seq_len} exceeds the model's "
                             f"max_position_embeddings {self.model.max_position_embeddings}")
        if self.batch.micro_batch % self.attn_bwd_chunks:
            raise ValueError(f"attn_bwd_chunks {self.attn_bwd_chunks} must divide the micro-batch "
                             f"{self.batch.micro_batch}: the attention backward runs over equal parts of it")
        s = self.sharding
        if self.inventory.count * self.inventory.nodes == 1 and (s.optimizer or s.gradients) and not s.weights:
            raise ValueError("sharding.optimizer or sharding.gradients on one GPU: ZeRO-1 and ZeRO-2 have nothing to "
                             "shard over there: leave them false (on one GPU, sharding.weights streams the weights "
                             "from host memory)")
        if self.inventory.nodes > 1 and self.collectives != "nccl":
            raise ValueError(f"{self.inventory.nodes} machines need collectives=nccl: copy engines reach only "
                             f"the GPUs of one machine")
        return self

    @property
    def num_gpus(self) -> int:
        """Data-parallel ranks over all machines (the sharding divisor)."""
        return self.inventory.count * self.inventory.nodes

    @property
    def tokens_per_step(self) -> int:
        b = self.batch
        return b.micro_batch * b.seq_len * b.grad_accum * self.num_gpus

    @property
    def fp8(self) -> bool:
        return self.precision.matmul == "e4m3"

    def inputs(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude={"estimate"})

    def inputs_hash(self) -> str:
        blob = json.dumps(self.inputs(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.model_validate_json(text)


# --- reading plan files ---------------------------------------------------------------------------
class PlanFileError(ValueError):
    """A file that is not a plan this llmqgen can use; the message says what it is and what to do."""


def validation_summary(e: ValidationError, limit: int = 2) -> str:
    """Pydantic's errors in one line: `batch.micro_batch: Input should be ...; and 3 more`."""
    parts = []
    for err in e.errors()[:limit]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    more = len(e.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _describe(data) -> str:
    if isinstance(data, dict):
        keys = ", ".join(list(map(str, data))[:6]) + (", ..." if len(data) > 6 else "")
        return f"a JSON object with keys {keys}" if data else "an empty JSON object"
    return f"a JSON {type(data).__name__.replace('str', 'string').replace('NoneType', 'null')}"


def plan_from_text(text: str, source: str = "the plan") -> Plan:
    """A Plan from a plan file's text; PlanFileError (one line) for anything else."""
    if not text.strip():
        raise PlanFileError(f"{source} is not an llmqgen plan (the file is empty): make one with `llmqgen plan`")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{source} is not an llmqgen plan (not valid JSON: {e.msg}: line {e.lineno} "
                            f"column {e.colno}; a truncated file?): make one with `llmqgen plan`") from None
    if not isinstance(data, dict) or not {"schema", "model", "inventory", "batch"} <= set(data):
        raise PlanFileError(f"{source} is not an llmqgen plan ({_describe(data)}; a plan has schema, model, "
                            f"inventory and batch): make one with `llmqgen plan`")
    version = data["schema"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise PlanFileError(f"{source} is not an llmqgen plan (schema {version!r} is not a version number)")
    if version > SCHEMA_VERSION:
        raise PlanFileError(f"{source} was written by a newer llmqgen (schema {version} > {SCHEMA_VERSION}): "
                            f"upgrade llmqgen to read it, or re-run `llmqgen plan` with this one")
    if version < SCHEMA_VERSION:
        raise PlanFileError(f"{source} was written by an older llmqgen (schema {version} < {SCHEMA_VERSION}): "
                            f"re-run `llmqgen plan` to make a new one")
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise PlanFileError(f"{source} is not a valid llmqgen plan ({validation_summary(e)}): "
                            f"re-run `llmqgen plan` to make a new one") from None


def load_plan(path: str | Path) -> Plan:
    """A Plan from a plan file; PlanFileError (one line) when it cannot be read or is not a plan."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PlanFileError(f"{path} is not an llmqgen plan (not a text file): make one with `llmqgen plan`") from None
    except OSError as e:
        raise PlanFileError(f"cannot read {path}: {e.strerror or e}") from None
    return plan_from_text(text, str(path))


def check_plan_name(name: str) -> str:
    """Plan names become file names (plans/<name>.json): one plain file name, no directories."""
    bad = (not name.strip() or name != name.strip() or any(c in name for c in "/\\:")
           or name.startswith(".") or any(ord(c) < 32 for c in name))
    if bad:
        # the suggestion must not start with "-" either: as a name, "-x" would read as an option
        safe = "-".join(x for x in re.split(r"[^A-Za-z0-9_.+-]+", name) if x).lstrip(".-_+")
        raise ValueError(f"plan name {name!r} must be a plain file name (no '/', '\\', ':', leading '.' or "
                         f"spaces at the ends)" + (f": e.g. --name {safe}" if safe else ""))
    return name
