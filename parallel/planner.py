"""How much memory one GPU needs for a training layout, and which layout to run.

A candidate is a layout, tensor parallelism (tp) x pipeline stages (pp) x data parallelism
(dp = GPUs / (tp x pp); parallel/layout.py), with a DeepSpeed ZeRO stage, a micro-batch and an
activation-checkpointing mode. `estimate` adds up, for the busiest rank, the terms below; `plan`
lists the candidates for a GPU count that fit a GPU's memory and picks one by the documented rule
`PREFERENCE`. `foundry plan` prints both. Models are read from their config's numbers (`ModelShape.of`),
never built.

Model states (ZeRO, Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", section 3.1): with P parameters on a rank, mixed-precision AdamW holds
2P bytes of bf16 weights, 2P of bf16 gradients and 12P of optimizer state (an fp32 master copy
and fp32 exp_avg and exp_avg_sq). ZeRO divides by dp what it partitions: stage 1 the optimizer
state, stage 2 also the gradients, stage 3 also the weights. In fp32 the weights and gradients
take 4P each and AdamW's moments 8P; DeepSpeed's ZeRO optimizers (stage >= 1) still keep a
separate fp32 copy of their partition to step (`single_partition_of_fp32_groups`, cloned even
when the model is fp32: measured in benchmarks/memory.py), so fp32 under ZeRO >= 1 is 12P too.
Also measured: ZeRO-1 keeps whole gradients between micro-batches (the paper's rule is its
peak), and ZeRO-2 holds two gradient partitions while accumulating (see `estimate`).
bf16 gradients are summed across micro-batches in fp32, as Megatron-LM and torchtitan sum them
(foundry.pretrain.engine): ZeRO-1 (DeepSpeed's BF16_Optimizer) then holds 6P of gradients, a
whole fp32 sum next to the bf16 `param.grad`s, ZeRO-2 and 3 a 4P fp32 sum divided by dp, and bf16
without ZeRO is refused (`Precision.gradients`).
P itself is the busiest pipeline stage's share: the blocks split across pp stages as the pipeline
splits them (balanced by training FLOPs, parallel/stages.py), the embedding on the first, the
final norm and output head on the last (a tied head keeps its own copy there), and every matrix
split across tp ranks (Megatron-LM, Shoeybi et al. 2019). Norm gains are replicated on every tp
rank, as are k/v projections when there are fewer kv heads than tp ranks (what
parallel/tensor.py does); the vocabulary is padded to a multiple of tp.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4): the bytes each op saves for backward, summed per transformer block. The
paper's GPT block keeps s*b*h*(34 + 5*a*s/h) bytes in 16-bit (sequence s, micro-batch b, hidden
h, heads a; table 2); this model's ops give s*b*h*(20 + 4*kv/a + 8*f/h + 5*a*s/h) instead (kv
heads, MLP width f; `layer_activation_bytes` itemises it), 49 rather than 34 for Llama 3 8B:
the SwiGLU MLP keeps four f-wide tensors and the RMSNorms an fp32 copy of their input. An H100
measured the per-block figure within 2% (benchmarks/RESULTS.md). Tensor parallelism divides
what lives inside attention and the MLP by tp; sequence parallelism also the norms. The 5*a*s/h
term is the s x s attention scores and softmax: fused kernels (flash-attn, and torch's SDPA on
GPU, the paths pretrain/kernels.py takes) never store them, so it is counted only with
`attention_scores=True`. A recomputed (checkpointed) block keeps only its 2*s*b*h input, and
backward rebuilds one block at a time. With pipelining (1F1B), stage i keeps
min(pp - i, micro-batches per step) micro-batches in flight: stage 0 the most. The last stage
adds the head's inputs and the fp32 log-probabilities of the loss, b*s*V/tp*4 bytes. fp32
activations are taken as twice bf16.

Buffers: DeepSpeed's ZeRO (stage >= 1) reduces gradients through a bucket it allocates whole,
`reduce_bucket_size` = 5e8 elements of the gradient dtype (1 GB in bf16, 2 GB in fp32, however
small the model: measured), alive during backward under stages 1-2 and for good under stage 3
(bf16 under ZeRO-1 runs BF16_Optimizer, which has none).
ZeRO-3 also gathers whole weights for the block it computes and the one it prefetches.

Left out, and covered by `HEADROOM` (10% of the GPU) and the fixed `OVERHEAD_BYTES` (1 GiB for
the CUDA context and kernels): allocator fragmentation, NCCL's own buffers, the transient
copies at the loss (bf16 logits, the gradient of the logits) and at the optimizer step (ZeRO-0's
flattened all-reduce copy of the gradients, fp32 upcasts of a gradient partition), tp/sp
communication buffers, and DeepSpeed's persistence of parameters under 1e5 elements in ZeRO-3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from foundry.parallel.layout import Layout, LayoutError, recompute_every
from foundry.parallel.stages import stage_blocks

GIB = 2**30
HEADROOM = 0.10  # of each GPU's memory, kept free for fragmentation and what is left out above
OVERHEAD_BYTES = 1 * GIB  # CUDA context, cuBLAS/NCCL workspaces: about 1 GiB on an H100
REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's zero_optimization.reduce_bucket_size default
MAX_TP = 8  # GPUs of one node: tensor parallelism all-reduces in every layer and needs NVLink
MICRO_BATCHES = (1, 2, 4, 8)
CHECKPOINTING = ("off", "selective", "full")  # in order of recomputation cost
SELECTIVE_INTERVAL = 2  # parallel.activation_checkpointing_interval's default


class PlanError(LayoutError):
    """A request the planner cannot meet; the message is one line naming the fix."""


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter and per activation element of a training precision."""

    name: str
    weights: int
    grads: int  # a micro-batch's gradients, in the weights' dtype
    activations: int
    accumulate: int = 4  # the gradients' sum over micro-batches: fp32 in both (data_types.grad_accum_dtype)
    moments: int = 8  # AdamW's exp_avg and exp_avg_sq, fp32 in both precisions
    master: int = 4  # the fp32 copy the optimizer steps

    @property
    def separate_sum(self) -> bool:
        """Whether DeepSpeed sums gradients apart from `param.grad` (bf16: in an fp32 buffer)."""
        return self.accumulate != self.grads

    def gradients(self, zero_stage: int, dp: int, accumulating: bool) -> float:
        """Gradient bytes per parameter at their peak, as DeepSpeed's engines hold them (tests/test_memory.py
        counts live engines). Summing in the
        weights' dtype (fp32), ZeRO 0-1 sum in `param.grad`, whole, and ZeRO-2 holds two partitions
        while accumulating (see `estimate`). Summing in fp32 apart (bf16), ZeRO-1 runs DeepSpeed's
        BF16_Optimizer: a whole fp32 buffer next to every `param.grad`, kept until the step; ZeRO-2 and
        3 one fp32 partition (ZeRO-2 frees the bf16 gradients once reduced). bf16 without ZeRO is
        refused (foundry.pretrain.engine.deepspeed_config)."""
        if self.separate_sum:
            return self.grads + self.accumulate if zero_stage <= 1 else self.accumulate / dp
        return self.grads * (2 if zero_stage == 2 and accumulating else 1) / (dp if zero_stage >= 2 else 1)

    def optimizer(self, zero_stage: int) -> int:
        """Optimizer bytes per parameter. With fp32 weights and no ZeRO, torch's AdamW steps the
        model's own weights; DeepSpeed's ZeRO optimizers step a separate fp32 partition."""
        needs_master = self.weights < 4 or zero_stage >= 1
        return self.moments + (self.master if needs_master else 0)


PRECISIONS = {"bf16": Precision("bf16", weights=2, grads=2, activations=2),
              "fp32": Precision("fp32", weights=4, grads=4, activations=4)}


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from a Llama config, and its parameters by how tp splits them."""

    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    layers: int
    vocab: int
    tied: bool
    block_split: int  # matrices every tp rank holds 1/tp of
    block_kv: int  # k and v projections: split when tp divides the kv heads, else whole on each rank
    block_replicated: int  # norm gains, whole on every tp rank

    @staticmethod
    def of(model: Any) -> ModelShape:
        """From a model section with hidden_size, num_heads, num_kv_heads, ffn_hidden_size, num_layers,
        vocab_size and tie_embeddings (pretrain's ModelConfig). A block of pretrain/model.py holds
        q and o (hidden x hidden each), k and v (hidden x kv_heads * head_dim each), the SwiGLU's
        gate, up and down (hidden x ffn each) and two norm gains (hidden each)."""
        h, f = model.hidden_size, model.ffn_hidden_size
        head_dim = h // model.num_heads
        return ModelShape(h, model.num_heads, model.num_kv_heads, f, model.num_layers, model.vocab_size,
                          model.tie_embeddings, block_split=2 * h * h + 3 * h * f,
                          block_kv=2 * h * model.num_kv_heads * head_dim, block_replicated=2 * h)

    def block_parameters(self, tp: int) -> int:
        """One tp rank's parameters of a transformer block."""
        kv = self.block_kv // tp if self.kv_heads % tp == 0 else self.block_kv
        return self.block_split // tp + kv + self.block_replicated

    def vocab_parameters(self, tp: int) -> int:
        """One tp rank's rows of the embedding or the head: the vocabulary padded to a multiple of tp."""
        return math.ceil(self.vocab / tp) * self.hidden


@dataclass(frozen=True)
class Candidate(Layout):
    """One way to train on tp x pp x dp GPUs: the layout and the choices that set each GPU's memory."""

    zero_stage: int = 0
    micro_batch: int = 1
    checkpointing: str = "off"  # off | selective (every checkpoint_interval-th block) | full
    checkpoint_interval: int = SELECTIVE_INTERVAL
    sequence_parallel: bool = False  # needs tp > 1

    def __str__(self) -> str:
        return (f"{super().__str__()}, ZeRO-{self.zero_stage}, micro-batch {self.micro_batch}, "
                f"activation checkpointing {self.checkpointing}")


@dataclass(frozen=True)
class Memory:
    """Bytes one GPU holds at its peak, by what holds them."""

    params: float
    grads: float
    optimizer: float
    activations: float
    bucket: float  # DeepSpeed's gradient reduce bucket
    gathered: float  # ZeRO-3: whole weights of the block computed and the one prefetched
    overhead: float = OVERHEAD_BYTES
    stage: int = 0  # the pipeline stage these are of

    @property
    def buffers(self) -> float:
        return self.bucket + self.gathered

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers + self.overhead


def stage_parameters(shape: ModelShape, tp: int, pp: int, stage: int, seq_len: int) -> int:
    """Parameters one tp rank of pipeline `stage` holds, its blocks as the pipeline assigns them for
    sequences of `seq_len` (parallel/stages.py)."""
    n = len(stage_blocks(shape, pp, seq_len)[stage]) * shape.block_parameters(tp)
    if stage == 0:
        n += shape.vocab_parameters(tp)  # input embedding
    if stage == pp - 1:
        n += shape.hidden  # final norm
        if not shape.tied or pp > 1:  # a tied head on its own stage keeps a copy of the embedding
            n += shape.vocab_parameters(tp)
    return n


def layer_activation_bytes(shape: ModelShape, layout: Candidate, seq_len: int,
                           attention_scores: bool) -> tuple[float, float]:
    """(stored, recomputed): 16-bit bytes one block keeps for backward per micro-batch, without and
    with checkpointing. Korthikanti et al.'s accounting (section 4.1: what each op saves for its
    backward) applied to this model's ops, in units of s*b*h bytes:

        two RMSNorms: the fp32 copy of the input (4) and the bf16 output (2) each    12  /tp under sp
        inputs of q/k/v and gate/up (parallel/tensor.py gathers the sequence first)    4
        q and the attention output (2 each), k and v (2 x kv_heads/heads each)     4 + 4kv/a  /tp
        SwiGLU: gate, silu(gate), up and their product (2 x ffn/hidden each)           8f/h  /tp
        attention scores and softmax, where an unfused kernel stores them              5as/h  /tp

    i.e. 20 + 4kv/a + 8f/h = 49 for Llama 3 8B (GPT's is the paper's 34); an H100 measured
    50.0, 52.0, 42.5, 45.5 and 37.0 for the kv and ffn sizes in tests/test_planner.py. A
    checkpointed block keeps only its 2*s*b*h input (/tp under sp: the residual is split)."""
    s, b, h, a, t = seq_len, layout.micro_batch, shape.hidden, shape.heads, layout.tp
    split = t if layout.sequence_parallel else 1  # what sequence parallelism divides
    kv_per_rank = shape.kv_heads // t if shape.kv_heads % t == 0 else 1  # fewer kv heads than tp: one whole
    norms = 12 / split
    inputs = 4.0
    attention = 4 / t + 4 * kv_per_rank / a
    mlp = 8 * shape.ffn / h / t
    scores = 5 * a * s / h / t if attention_scores else 0.0
    sbh = s * b * h
    return sbh * (norms + inputs + attention + mlp + scores), 2 * sbh / split


def head_activation_bytes(shape: ModelShape, layout: Candidate, seq_len: int) -> tuple[float, float]:
    """(16-bit inputs, fp32 logits): what the last stage keeps past its blocks per micro-batch:
    the final RMSNorm (6 s*b*h, /tp under sp) and the head's gathered input (2 s*b*h); then the
    fp32 log-probabilities the loss keeps, s*b*V/tp*4 bytes."""
    sbh = seq_len * layout.micro_batch * shape.hidden
    inputs = sbh * (6 / (layout.tp if layout.sequence_parallel else 1) + 2)
    return inputs, seq_len * layout.micro_batch * math.ceil(shape.vocab / layout.tp) * 4


def activation_bytes(shape: ModelShape, layout: Candidate, seq_len: int, precision: Precision, stage: int,
                     in_flight: int, attention_scores: bool = False) -> float:
    """Activations pipeline `stage` keeps: `in_flight` micro-batches of its blocks, one block
    rebuilt by recomputation in backward, and on the last stage the head's inputs and logits of one
    micro-batch (1F1B runs backward there as soon as a micro-batch's forward ends)."""
    stored, recomputed = layer_activation_bytes(shape, layout, seq_len, attention_scores)
    blocks = stage_blocks(shape, layout.pp, seq_len)[stage]
    every = recompute_every(layout.checkpointing, layout.checkpoint_interval)
    checkpointed = sum(1 for i in blocks if every and i % every == 0)  # blocks 0, every, 2 x every, ... as the model
    per_micro_batch = (len(blocks) - checkpointed) * stored + checkpointed * recomputed
    sixteen_bit = in_flight * per_micro_batch + (stored if checkpointed else 0)
    logits = 0.0
    if stage == layout.pp - 1:
        inputs, logits = head_activation_bytes(shape, layout, seq_len)
        sixteen_bit += inputs
    return sixteen_bit * precision.activations / 2 + logits  # fp32 runs taken as twice the 16-bit bytes


def estimate(shape: ModelShape, layout: Candidate, seq_len: int, precision: str = "bf16",
             global_batch: Optional[int] = None, attention_scores: bool = False,
             reduce_bucket: int = REDUCE_BUCKET_ELEMENTS) -> Memory:
    """Peak bytes on the busiest GPU of `layout`: every pipeline stage estimated (the first keeps the
    most micro-batches in flight, the last the head and logits, a middle one may hold the most
    blocks), the largest returned with its `stage`; on a tie, the earliest.

    Without `global_batch` the step is taken to accumulate gradients over several micro-batches,
    as pretraining at scale does. Accumulating in fp32, DeepSpeed's ZeRO-2 holds two gradient partitions
    during backward (the one accumulated so far and the current micro-batch's reduced one,
    `grads_in_partition`); in bf16 one fp32 partition (`Precision.gradients`): measured, with a reduce
    bucket smaller than the model as in any model worth planning for (`reduce_bucket` is DeepSpeed's
    zero_optimization.reduce_bucket_size; bf16's BF16_Optimizer, ZeRO-1, has none)."""
    stages = [stage_memory(shape, layout, seq_len, precision, global_batch, stage, attention_scores, reduce_bucket)
              for stage in range(layout.pp)]
    return max(stages, key=lambda m: m.total)


def stage_memory(shape: ModelShape, layout: Candidate, seq_len: int, precision: str, global_batch: Optional[int],
                 stage: int, attention_scores: bool = False, reduce_bucket: int = REDUCE_BUCKET_ELEMENTS) -> Memory:
    """Peak bytes on a GPU of pipeline `stage` of `layout` (`estimate` gives the arguments' meaning)."""
    prec = PRECISIONS[precision]
    z, dp = layout.zero_stage, layout.dp
    accum = global_batch // (layout.micro_batch * dp) if global_batch else None
    accumulating = accum is None or accum > 1
    bucket = reduce_bucket * prec.grads if z >= 2 or (z == 1 and not prec.separate_sum) else 0.0
    largest = max(shape.block_parameters(layout.tp), shape.vocab_parameters(layout.tp))
    n = stage_parameters(shape, layout.tp, layout.pp, stage, seq_len)
    return Memory(
        params=n * prec.weights / (dp if z >= 3 else 1),
        grads=n * prec.gradients(z, dp, accumulating),
        optimizer=n * prec.optimizer(z) / (dp if z >= 1 else 1),
        activations=activation_bytes(shape, layout, seq_len, prec, stage,
                                     min(layout.pp - stage, accum or layout.pp), attention_scores),
        bucket=bucket,
        gathered=2 * largest * prec.weights if z == 3 else 0.0,
        stage=stage,
    )


# The pick: layouts compare on these criteria in order, the first difference deciding.
PREFERENCE: tuple[tuple[str, Callable[[Candidate], float]], ...] = (
    # Tensor parallelism all-reduces activations in every layer; pipelining idles GPUs in its
    # bubble. Data parallelism communicates once per step and overlaps it with backward.
    ("fewer model-parallel GPUs (tp x pp)", lambda l: l.tp * l.pp),
    ("fewer pipeline stages (no bubble)", lambda l: l.pp),
    # ZeRO-1 and -2 move the same bytes as plain data parallelism; ZeRO-3 gathers the weights
    # again in forward and backward, 1.5x the traffic.
    ("no ZeRO-3 (1.5x the communication)", lambda l: l.zero_stage == 3),
    ("less recomputation (full costs about a third more compute)", lambda l: CHECKPOINTING.index(l.checkpointing)),
    ("a larger micro-batch (fuller matrix multiplies)", lambda l: -l.micro_batch),
    ("a lower ZeRO stage (less bookkeeping)", lambda l: l.zero_stage),
)


def preference_key(layout: Candidate) -> tuple[float, ...]:
    return tuple(rank(layout) for _, rank in PREFERENCE)


def layouts(cfg: Any, gpus: int, global_batch: Optional[int] = None, precision: str = "bf16") -> Iterator[Candidate]:
    """Every candidate worth considering on `gpus` GPUs for the model section `cfg` (ModelShape.of's
    fields): tp a power of two up to a node, pp dividing the layers, ZeRO 0-3, micro-batch in
    MICRO_BATCHES (dividing each data-parallel rank's share of the global batch, when given), each
    checkpointing mode; and only what the trainer accepts (Layout.check: tp divides the heads and the
    MLP, ZeRO 0-1 under pipelining; bf16 needs ZeRO >= 1, the only way DeepSpeed sums gradients in fp32:
    pretrain/engine.py). When dp = 1 only the lowest stage is tried: partitioning over one rank saves nothing."""
    lowest = 1 if precision == "bf16" else 0
    for tp, pp in ((t, p) for t in (1, 2, 4, 8) for p in range(1, cfg.num_layers + 1)):
        if tp > MAX_TP or gpus % (tp * pp) or cfg.num_layers % pp:
            continue
        dp = gpus // (tp * pp)
        for zero in range(lowest, 4) if dp > 1 else (lowest,):
            try:
                Layout(tp, pp, dp).check(cfg, zero, sequence_parallel=tp > 1)
            except LayoutError:
                continue
            for micro in MICRO_BATCHES:
                if global_batch and global_batch % (micro * dp):
                    continue
                for ckpt in CHECKPOINTING:
                    yield Candidate(tp, pp, dp, zero, micro, ckpt, sequence_parallel=tp > 1)


@dataclass
class Plan:
    """The layouts that fit, best first by PREFERENCE, and the request they answer."""

    model: str
    gpus: int
    gpu_memory_gib: float
    seq_len: int
    precision: str
    global_batch: Optional[int]
    fits: list[tuple[Candidate, Memory]] = field(default_factory=list)
    considered: int = 0

    @property
    def pick(self) -> tuple[Candidate, Memory]:
        return self.fits[0]


def plan(cfg: Any, gpus: int, gpu_memory_gib: float, seq_len: Optional[int] = None, precision: str = "bf16",
         global_batch: Optional[int] = None, model_name: str = "the model") -> Plan:
    """Estimate every layout of `layouts` and keep those within (1 - HEADROOM) of the GPU's memory,
    best first. Raises PlanError (one line naming the fix) on a bad argument or when none fits."""
    seq_len = default_seq_len(cfg) if seq_len is None else seq_len
    checks = {"--gpus": (gpus, 8), "--gpu-memory-gib": (gpu_memory_gib, 80), "--seq-len": (seq_len, 4096),
              "--global-batch": (global_batch, 512)}
    for flag, (value, example) in checks.items():
        if value is not None and value <= 0:
            raise PlanError(f"{flag}={value} must be positive: pass e.g. {flag} {example}")
    if seq_len > cfg.max_seq_len:
        raise PlanError(f"--seq-len={seq_len} exceeds model.max_seq_len={cfg.max_seq_len}: pass a shorter sequence")
    if precision not in PRECISIONS:
        raise PlanError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    shape = ModelShape.of(cfg)
    budget = gpu_memory_gib * GIB * (1 - HEADROOM)
    result = Plan(model_name, gpus, gpu_memory_gib, seq_len, precision, global_batch)
    leanest: Optional[tuple[Candidate, Memory]] = None
    for layout in layouts(cfg, gpus, global_batch, precision):
        memory = estimate(shape, layout, seq_len, precision, global_batch)
        result.considered += 1
        if leanest is None or memory.total < leanest[1].total:
            leanest = (layout, memory)
        if memory.total <= budget:
            result.fits.append((layout, memory))
    if not result.fits:
        raise PlanError(_nothing_fits(result, leanest, budget))
    result.fits.sort(key=lambda item: preference_key(item[0]))
    return result


def _nothing_fits(result: Plan, leanest: Optional[tuple[Candidate, Memory]], budget: float) -> str:
    batch = f", global batch {result.global_batch}" if result.global_batch else ""
    head = f"no layout of {result.model} fits {result.gpus} x {result.gpu_memory_gib:g} GiB (seq {result.seq_len}, " \
           f"{result.precision}{batch})"
    if leanest is None:
        return (f"{head}: no layout splits the global batch; pass a multiple of --gpus, "
                f"e.g. --global-batch {8 * result.gpus}")
    layout, memory = leanest
    shorter = ", or a shorter --seq-len" if memory.total - memory.activations <= budget else ""
    return (f"{head}: the leanest, {layout}, needs {memory.total / GIB:.1f} GiB per GPU; "
            f"use more GPUs or more memory per GPU{shorter}")


def default_seq_len(cfg: Any) -> int:
    """The presets' pretraining context: max_seq_len, capped at 8192 (Llama 3's, before long-context extension)."""
    return min(cfg.max_seq_len, 8192)


def why(result: Plan) -> str:
    """Why the pick won: the criterion on which it beats the runner-up, or that nothing else fits."""
    (best, _), rest = result.pick, result.fits[1:]
    if not rest:
        return "it is the only layout that fits"
    runner_up = rest[0][0]
    for (reason, rank) in PREFERENCE:
        if rank(best) != rank(runner_up):
            return f"it beats the next best ({runner_up}) on {reason}"
    return "it ties with the next best on every criterion"


def format_plan(result: Plan, top: int = 15) -> str:
    """The table of the best `top` layouts that fit and the pick, with the rule and the reason."""
    budget = result.gpu_memory_gib * (1 - HEADROOM)
    lines = [
        f"{result.model}: {result.gpus} GPUs x {result.gpu_memory_gib:g} GiB, seq {result.seq_len}, {result.precision}"
        + (f", global batch {result.global_batch}" if result.global_batch else "")
        + f" | {len(result.fits)} of {result.considered} layouts fit in {budget:.1f} GiB "
        f"({HEADROOM:.0%} headroom); GiB per GPU, busiest rank:",
        f"{'':2}{'tp':>3}{'pp':>4}{'dp':>5}{'zero':>5}{'micro':>6}  {'ckpt':<9}"
        f"{'params':>7}{'grads':>7}{'optim':>7}{'activ':>7}{'buffers':>8}{'total':>7}",
    ]
    for i, (l, m) in enumerate(result.fits[:top]):
        lines.append(
            f"{'*' if i == 0 else '':2}{l.tp:>3}{l.pp:>4}{l.dp:>5}{l.zero_stage:>5}{l.micro_batch:>6}  "
            f"{l.checkpointing:<9}"
            + "".join(f"{v / GIB:>7.1f}" for v in (m.params, m.grads, m.optimizer, m.activations))
            + f"{m.buffers / GIB:>8.1f}{m.total / GIB:>7.1f}"
        )
    if len(result.fits) > top:
        lines.append(f"  ... and {len(result.fits) - top} more")
    layout, memory = result.pick
    lines += [
        f"totals include {OVERHEAD_BYTES / GIB:.0f} GiB of CUDA context; buffers: DeepSpeed's gradient reduce bucket "
        "(ZeRO >= 1) and ZeRO-3's gathered weights",
        f"pick: {layout} ({memory.total / GIB:.1f} GiB)",
        "rule: prefer " + ", then ".join(reason for reason, _ in PREFERENCE),
        f"why: {why(result)}",
    ]
    return "\n".join(lines)
