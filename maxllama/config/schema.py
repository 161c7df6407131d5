"""The typed run configuration: every key, its type, its default and one line of doc.

Sections are frozen pydantic models that reject unknown keys and wrong types (strict mode: a YAML string
is never silently turned into a number). Cross-field rules live in `validate_consistency`, so that a bad
combination is reported with the dotted key it concerns before anything is compiled.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

DType = Literal["float32", "bfloat16"]


class Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class RunConfig(Section):
    name: str = Field("tiny", description="Run name; used in the default run directory and in logs.")
    dir: str = Field("runs/{name}", description="Run directory; '{name}' is replaced by run.name.")


class RopeScalingConfig(Section):
    factor: float = Field(16.0, description="Divide low frequencies by this factor ('llama3' scaling).")
    low_freq_factor: float = Field(1.0, description="Wavelengths above original/low are fully scaled.")
    high_freq_factor: float = Field(1.0, description="Wavelengths below original/high are kept.")
    original_max_position: int = Field(8192, description="Context length the frequencies were trained for.")


class ModelConfig(Section):
    vocab_size: int = Field(512, description="Embedding and output vocabulary size.")
    d_model: int = Field(128, description="Residual stream width.")
    n_layers: int = Field(4, description="Number of decoder layers.")
    n_heads: int = Field(4, description="Query heads per attention layer.")
    n_kv_heads: int = Field(2, description="Key/value heads (grouped-query attention); divides n_heads.")
    head_dim: Optional[int] = Field(None, description="Per-head width; default d_model // n_heads.")
    d_ff: int = Field(512, description="Hidden width of the dense SwiGLU feed-forward layers.")
    d_ff_expert: int = Field(256, description="Hidden width of each routed expert and of the shared expert.")
    n_experts: int = Field(4, description="Routed experts per MoE layer.")
    top_k: int = Field(1, description="Experts chosen per token.")
    shared_expert: bool = Field(True, description="Add an always-on shared expert to each MoE layer.")
    moe_every: int = Field(2, description="MoE at 0-based layers moe_every-1, 2*moe_every-1, ...; 0: no MoE.")
    nope_every: int = Field(4, description="Layer i is NoPE (global attention) when (i+1) % nope_every == 0; 0: none.")
    attn_chunk: Optional[int] = Field(64, description="Chunk size of local attention on RoPE layers; null: global.")
    qk_norm: bool = Field(True, description="Weightless RMS norm of q and k after RoPE, on RoPE layers.")
    attn_temperature_tuning: bool = Field(True, description="Scale NoPE-layer queries up with log position.")
    attn_scale: float = Field(0.1, description="Temperature tuning strength.")
    floor_scale: float = Field(8192.0, description="Temperature tuning position granularity.")
    rope_theta: float = Field(500000.0, description="RoPE base.")
    rope_scaling: Optional[RopeScalingConfig] = Field(None, description="'llama3' frequency scaling; null: none.")
    norm_eps: float = Field(1e-5, description="RMSNorm epsilon.")
    param_dtype: DType = Field("float32", description="Dtype parameters are stored in.")
    compute_dtype: DType = Field("float32", description="Dtype of matmuls and activations (norms, softmax, loss in fp32).")
    remat: Literal["none", "full", "dots", "dots_no_batch"] = Field(
        "none", description="Rematerialisation of each scanned layer group: what the backward pass keeps.")
    scan_layers: bool = Field(True, description="Scan over repeating layer groups (compile time flat in depth).")
    moe_dispatch: Literal["dense", "dropless", "capacity"] = Field(
        "dropless", description="'dense': every expert sees every token; 'dropless': sorted grouped matmul; "
                                "'capacity': fixed per-expert buffers, overflow dropped and counted.")
    moe_capacity_factor: float = Field(
        1.25, description="'capacity' dispatch: slots per expert as a multiple of an even share of the tokens.")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def pattern_period(self) -> int:
        """Layers after which the (NoPE, MoE) pattern repeats: the unit of the layer scan."""
        return math.lcm(max(self.nope_every, 1), max(self.moe_every, 1))

    def is_nope(self, layer: int) -> bool:
        return self.nope_every > 0 and (layer + 1) % self.nope_every == 0

    def is_moe(self, layer: int) -> bool:
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0


class VisionConfig(Section):
    """The early-fusion vision encoder: a ViT over each image tile, a pixel-shuffle adapter and a projector to
    the decoder's width (docs/architecture.md, "Vision encoder")."""

    enabled: bool = Field(False, description="Model has a vision encoder and projector.")
    d_model: int = Field(1408, description="Vision transformer width.")
    n_layers: int = Field(34, description="Vision transformer layers.")
    n_heads: int = Field(16, description="Vision attention heads.")
    d_ff: int = Field(5632, description="Vision MLP width; also the pixel-shuffled width: d_model / pixel_shuffle_ratio^2.")
    image_size: int = Field(336, description="Tile side in pixels.")
    patch_size: int = Field(14, description="Patch side in pixels.")
    pixel_shuffle_ratio: float = Field(0.5, description="Spatial downsampling of the adapter's pixel shuffle.")
    projector_dim: int = Field(4096, description="Width of the adapter MLP (fc1, fc2).")
    norm_eps: float = Field(1e-5, description="LayerNorm epsilon.")
    max_tiles: int = Field(16, description="Most tiles an image is cut into (a global view is added when > 1).")
    tiles_per_row: Optional[int] = Field(
        None, description="Tile budget of one training row (static shapes); null: one image's most, max_tiles + 1.")
    rope_theta: float = Field(10000.0, description="Base of the 2D rotary embedding's frequencies.")

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def row_tiles(self) -> int:
        return self.tiles_per_row if self.tiles_per_row is not None else self.max_tiles + (self.max_tiles > 1)

    @property
    def tokens_per_tile(self) -> int:
        """<|patch|> tokens one tile becomes after the pixel shuffle."""
        return round((self.grid * self.pixel_shuffle_ratio) ** 2)


class TrainConfig(Section):
    steps: int = Field(1000, description="Optimizer steps.")
    batch_size: int = Field(16, description="Global batch size in sequences.")
    seq_len: int = Field(256, description="Tokens per sequence.")
    log_every: int = Field(10, description="Write metrics every this many steps.")
    eval_every: int = Field(200, description="Evaluate on held-out data every this many steps (and at the end).")
    eval_batches: int = Field(8, description="Batches in one evaluation.")
    load_balance_weight: float = Field(0.01, description="Weight of the MoE load-balancing loss.")
    router_z_weight: float = Field(0.001, description="Weight of the router z-loss.")
    grad_clip: Optional[float] = Field(1.0, description="Clip the global gradient norm to this; null: no clipping.")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="A NaN/Inf loss or gradient: skip that update (counted) or stop the run.")


class OptimConfig(Section):
    lr: float = Field(3e-3, description="Peak learning rate.")
    schedule: Literal["cosine", "wsd", "constant"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(100, description="Linear warmup steps from 0 to lr.")
    min_lr_ratio: float = Field(0.1, description="Final learning rate as a fraction of lr.")
    decay_fraction: float = Field(0.2, description="'wsd': fraction of all steps spent decaying at the end.")
    weight_decay: float = Field(0.1, description="Decoupled (AdamW) weight decay of matrices.")
    b1: float = Field(0.9, description="Adam first-moment decay.")
    b2: float = Field(0.95, description="Adam second-moment decay.")
    eps: float = Field(1e-8, description="Adam epsilon.")


class CheckpointConfig(Section):
    every_steps: int = Field(0, description="Save a checkpoint every this many steps; 0: only by time and at the end.")
    every_minutes: float = Field(0.0, description="Also save when this many minutes passed since the last save; 0: off.")
    keep: int = Field(3, description="Checkpoints kept: the newest ones (plus those kept by keep_every).")
    keep_every: int = Field(0, description="Also keep every checkpoint whose step is a multiple of this; 0: off.")
    async_save: bool = Field(True, description="Write arrays in the background while training goes on.")
    grace_seconds: float = Field(120.0, description="On SIGTERM/SIGINT, time allowed for the final save before exit.")


class SourceConfig(Section):
    path: str = Field("stdlib", description="File, folder, glob, gs://... URL, token store, or 'stdlib' (this "
                                            "Python's standard library source).")
    format: Literal["auto", "text", "jsonl", "parquet", "store", "image_caption", "interleaved"] = Field(
        "auto", description="auto: by suffix (.jsonl, .parquet), a folder with manifest.json is a store, else text; "
                            "image_caption: JSONL of {image, text} pairs; interleaved: JSONL documents whose "
                            "content is a list of {type: text, text} and {type: image, image} parts.")
    field: str = Field("text", description="JSONL field / Parquet column holding the text (interleaved: the key "
                                           "of a text part's text).")
    image_field: str = Field("image", description="image_caption: the field with the image's path or URL "
                                                  "(relative to the JSONL file's folder); interleaved: the key of "
                                                  "an image part's path or URL.")
    content_field: str = Field("content", description="interleaved: the field with the list of parts.")
    weight: float = Field(1.0, description="Share of this source in the mixture (normalised over sources).")


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig()],
                                        description="Sources, mixed by weight; each is read directly or from a store.")
    tokenizer: str = Field("byte", description="'byte', a Hugging Face tokenizer.json, or a SentencePiece .model.")
    val_fraction: float = Field(0.02, description="Fraction of documents held out for validation (by id hash).")
    packing: Literal["concat", "first_fit"] = Field(
        "concat", description="concat: documents end to end, cut into sequences; first_fit: whole documents "
                              "(split when longer than a sequence) packed into sequences, the rest padded.")
    workers: int = Field(0, description="Worker processes reading batches (0: threads in the training process).")
    prefetch: int = Field(4, description="Batches read ahead of the training step.")


class MeshConfig(Section):
    preset: Optional[Literal["dp", "fsdp", "fsdp_tp", "ep"]] = Field(
        None, description="Axis sizes by name: dp (data=-1), fsdp (fsdp=-1), fsdp_tp (tensor = devices per host, "
                          "fsdp=-1), ep (expert=-1); axis sizes set explicitly still win.")
    data: int = Field(1, description="Data-parallel mesh axis size (-1: all remaining devices).")
    fsdp: int = Field(-1, description="Fully-sharded data-parallel axis size (-1: all remaining devices).")
    tensor: int = Field(1, description="Tensor-parallel axis size.")
    expert: int = Field(1, description="Expert-parallel axis size.")
    dcn_data: int = Field(1, description="Outer (between slices/nodes, DCN) factor of the data axis.")
    dcn_fsdp: int = Field(1, description="Outer (between slices/nodes, DCN) factor of the fsdp axis.")
    device_memory_gb: Optional[float] = Field(None, description="Memory of one device; `maxllama preflight` fails "
                                                                "when the step needs more. null: no check.")
    rules: Optional[dict[str, Optional[str | list[str]]]] = Field(
        None, description="Overrides of the logical-axis -> mesh-axis table (null keeps the default table).")

    @property
    def axes(self) -> dict[str, int]:
        """Axis sizes: the preset's, overridden by any size the config sets explicitly."""
        explicit = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "expert": self.expert}
        if self.preset is None:
            return explicit
        preset = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1, **MESH_PRESETS[self.preset]}
        return {axis: explicit[axis] if axis in self.model_fields_set else preset[axis] for axis in explicit}


# "local" is replaced by the number of devices on one host: tensor parallelism stays inside a node.
MESH_PRESETS: dict[str, dict[str, int | str]] = {
    "dp": {"data": -1},
    "fsdp": {"fsdp": -1},
    "fsdp_tp": {"fsdp": -1, "tensor": "local"},
    "ep": {"expert": -1},
}


class DistributedConfig(Section):
    coordinator: Optional[str] = Field(None, description="host:port of process 0; null: from the environment "
                                                         "(MAXLLAMA_COORDINATOR) or the scheduler (SLURM, TPU VM).")
    num_processes: Optional[int] = Field(None, description="Processes in the job; null: from the environment.")
    process_id: Optional[int] = Field(None, description="This process's index; null: from the environment.")
    cpu_devices_per_process: Optional[int] = Field(None, description="CPU devices each process exposes (testing "
                                                                     "multi-host on one machine).")


class MetaPBaseConfig(Section):
    """The proxy that MetaP's hyperparameters were tuned on; null keys: same as this run (ratio 1)."""

    d_model: Optional[int] = Field(None, description="Proxy residual width.")
    d_ff: Optional[int] = Field(None, description="Proxy dense FFN width.")
    d_ff_expert: Optional[int] = Field(None, description="Proxy expert FFN width.")
    n_heads: Optional[int] = Field(None, description="Proxy query heads.")
    n_kv_heads: Optional[int] = Field(None, description="Proxy key/value heads.")
    head_dim: Optional[int] = Field(None, description="Proxy head width.")
    n_layers: Optional[int] = Field(None, description="Proxy depth.")
    batch_size: Optional[int] = Field(None, description="Proxy batch size in sequences (for kappa).")
    tokens: Optional[int] = Field(None, description="Proxy training tokens, steps x batch x seq_len (for beta).")

    vision_d_model: Optional[int] = Field(None, description="Proxy vision encoder width.")
    vision_d_ff: Optional[int] = Field(None, description="Proxy vision MLP width.")
    vision_n_heads: Optional[int] = Field(None, description="Proxy vision attention heads.")
    vision_projector_dim: Optional[int] = Field(None, description="Proxy vision adapter width.")

    WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("d_model", "d_ff", "d_ff_expert", "n_heads", "n_kv_heads", "head_dim")
    VISION_WIDTH_KEYS: ClassVar[tuple[str, ...]] = ("d_model", "d_ff", "n_heads", "projector_dim")  # vision_*


class MetaPExponents(Section):
    """The width exponents of the rules (muP for Adam by default); ratios are raised to these powers."""

    hidden_init: float = Field(0.5, description="Hidden init std x m^-hidden_init.")
    hidden_lr: float = Field(1.0, description="Hidden LR x m^-hidden_lr; hidden weight decay x m^hidden_lr "
                                              "(keeps LR x weight decay fixed).")
    embedding_lr: float = Field(0.0, description="Embedding LR x m_d^-embedding_lr (0: muP; 0.5: u-muP's rule).")
    output: float = Field(1.0, description="Logits and router logits x m_d^-output.")
    eps: float = Field(1.0, description="Adam eps x m_d^-eps (gradients shrink with width).")
    attention: float = Field(1.0, description="Attention logits x head_dim^-attention (1: muP; 0.5: standard).")
    clip_norm: float = Field(1.0, description="The norm train.grad_clip bounds counts the squared gradient of every "
                                              "non-hidden parameter x m^clip_norm (those gradients shrink as m^-1/2 "
                                              "with width, the hidden ones' do not); 0: the plain global norm.")


class MetaPConfig(Section):
    """Per-group init scales, multipliers and learning rates (docs/metap.md). With `parametrization: metap`, the
    numbers below are the proxy's tuned values and the rules carry them to this run's shape."""

    parametrization: Literal["standard", "metap"] = Field(
        "standard", description="standard: one init std, one LR, 1/sqrt(head_dim) attention; metap: the rules.")
    init_std: float = Field(0.02, description="standard: init std of every matrix.")
    base: MetaPBaseConfig = Field(MetaPBaseConfig(), description="The proxy's shape, batch size and tokens.")
    exponents: MetaPExponents = Field(MetaPExponents(), description="Width exponents of the rules.")
    depth_alpha: float = Field(1.0, description="Residual branches x (L/L0)^-alpha: 1 CompleteP, 0.5 depth-muP.")
    sigma_embedding: float = Field(0.02, description="Init std of the embedding.")
    sigma_hidden: float = Field(0.02, description="Init std of hidden matrices at the proxy's fan-in.")
    sigma_readout: float = Field(0.02, description="Init std of the unembedding and router (0: zero init).")
    zero_init_query: bool = Field(False, description="Initialise query projections to zero.")
    alpha_embedding: float = Field(1.0, description="Forward multiplier of the embedding output.")
    alpha_output: float = Field(1.0, description="Logits x alpha_output / m_d.")
    alpha_router: float = Field(1.0, description="Router logits x alpha_router / m_d.")
    alpha_residual: float = Field(1.0, description="Residual branches x alpha_residual (L/L0)^-alpha.")
    alpha_attention: Optional[float] = Field(
        None, description="Attention logits x alpha_attention / head_dim; null: proxy head_dim^(exponent - 1/2), "
                          "which is 1/sqrt(head_dim) at the proxy.")
    lr_embedding: float = Field(1.0, description="c_emb: embedding LR = lr x c_emb.")
    lr_hidden: float = Field(1.0, description="c_h: hidden LR = lr x c_h / m x (L/L0)^(alpha-1).")
    lr_vector: float = Field(1.0, description="c_v: norm-gain LR = lr x c_v x (L/L0)^(alpha-1).")
    lr_readout: float = Field(1.0, description="c_out: unembedding LR = lr x c_out.")
    lr_router: float = Field(1.0, description="c_router: router LR = lr x c_router.")
    wd_embedding: float = Field(1.0, description="Embedding weight decay = optim.weight_decay x wd_embedding.")
    wd_hidden: float = Field(1.0, description="Hidden weight decay = optim.weight_decay x wd_hidden x m.")
    wd_readout: float = Field(1.0, description="Unembedding weight decay = optim.weight_decay x wd_readout.")
    wd_router: float = Field(1.0, description="Router weight decay = optim.weight_decay x wd_router.")
    kappa: float = Field(0.0, description="LR x (B/B0)^kappa: batch-size exponent (fitted by `metap transfer`).")
    beta: float = Field(0.0, description="LR x (D/D0)^-beta: training-token exponent (fitted by `metap transfer`).")
    weight_decay_timescale: bool = Field(
        False, description="Scale weight decay to keep the AdamW timescale B / (lr x wd x D) of the proxy.")


class LoggingConfig(Section):
    tensorboard: bool = Field(True, description="Write TensorBoard event files to run.dir/tensorboard.")
    progress: bool = Field(True, description="Show a console progress bar.")


class Config(Section):
    seed: int = Field(0, description="Seed of initialisation and data order.")
    resume: Literal["auto", "never", "require"] = Field(
        "auto", description="auto: resume if a checkpoint exists; never: start fresh; require: fail without one.")
    init_from: Optional[str] = Field(
        None, description="Start from this model directory's parameters (not its optimizer or data state).")
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    vision: VisionConfig = VisionConfig()
    train: TrainConfig = TrainConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()
    metap: MetaPConfig = MetaPConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def run_dir(self) -> str:
        return self.run.dir.replace("{name}", self.run.name)


def validate_consistency(cfg: Config) -> list[tuple[str, str]]:
    """Cross-field rules. Returns (dotted key, reason) for every violation; empty when consistent."""
    errors: list[tuple[str, str]] = []

    def check(ok: bool, key: str, reason: str) -> None:
        if not ok:
            errors.append((key, reason))

    m, t, o = cfg.model, cfg.train, cfg.optim
    positive = {
        "model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.d_ff": m.d_ff,
        "model.d_ff_expert": m.d_ff_expert, "train.steps": t.steps, "train.batch_size": t.batch_size,
        "train.seq_len": t.seq_len, "train.log_every": t.log_every, "train.eval_every": t.eval_every,
        "train.eval_batches": t.eval_batches, "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, value in positive.items():
        check(value > 0, key, f"must be positive, got {value}")
    for key, value in {"model.moe_every": m.moe_every, "model.nope_every": m.nope_every,
                       "optim.warmup_steps": o.warmup_steps, "checkpoint.every_steps": cfg.checkpoint.every_steps,
                       "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
                       "checkpoint.keep_every": cfg.checkpoint.keep_every,
                       "checkpoint.grace_seconds": cfg.checkpoint.grace_seconds,
                       "optim.weight_decay": o.weight_decay, "train.load_balance_weight": t.load_balance_weight,
                       "train.router_z_weight": t.router_z_weight}.items():
        check(value >= 0, key, f"must be >= 0, got {value}")
    if errors:
        return errors  # the rules below divide by these

    check(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
          f"n_heads ({m.n_heads}) must be a multiple of n_kv_heads ({m.n_kv_heads})")
    if m.head_dim is None:
        check(m.d_model % m.n_heads == 0, "model.head_dim",
              f"unset, so d_model ({m.d_model}) must be divisible by n_heads ({m.n_heads}); or set it")
    else:
        check(m.head_dim > 0, "model.head_dim", f"must be positive, got {m.head_dim}")
    check(m.resolved_head_dim % 2 == 0, "model.head_dim",
          f"rotary embedding rotates pairs, so head_dim must be even, got {m.resolved_head_dim}")
    if m.moe_every > 0:
        check(m.n_experts >= 1, "model.n_experts", f"MoE layers need at least one expert, got {m.n_experts}")
        check(1 <= m.top_k <= m.n_experts, "model.top_k",
              f"must be between 1 and n_experts ({m.n_experts}), got {m.top_k}")
        check(m.moe_every <= m.n_layers, "model.moe_every",
              f"MoE step {m.moe_every} exceeds n_layers ({m.n_layers}): no layer would be MoE; use 0 for none")
    if m.attn_chunk is not None:
        check(m.attn_chunk > 0, "model.attn_chunk", f"must be positive or null, got {m.attn_chunk}")
        if m.attn_chunk > 0 and m.attn_chunk < t.seq_len:
            check(t.seq_len % m.attn_chunk == 0, "model.attn_chunk",
                  f"chunk size {m.attn_chunk} must divide train.seq_len ({t.seq_len})")
    if m.rope_scaling is not None:
        r = m.rope_scaling
        check(r.factor >= 1, "model.rope_scaling.factor", f"must be >= 1, got {r.factor}")
        check(0 < r.low_freq_factor <= r.high_freq_factor, "model.rope_scaling.low_freq_factor",
              f"need 0 < low_freq_factor <= high_freq_factor, got {r.low_freq_factor} > {r.high_freq_factor}")
    check(m.moe_capacity_factor > 0, "model.moe_capacity_factor", f"must be positive, got {m.moe_capacity_factor}")
    check(m.floor_scale > 0, "model.floor_scale", f"must be positive, got {m.floor_scale}")
    check(m.norm_eps > 0, "model.norm_eps", f"must be positive, got {m.norm_eps}")

    if cfg.vision.enabled:
        errors += _vision_errors(cfg.vision)
    check(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    check(o.warmup_steps <= t.steps, "optim.warmup_steps",
          f"warmup ({o.warmup_steps}) is longer than the run (train.steps = {t.steps})")
    check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    for beta in ("b1", "b2"):
        value = getattr(o, beta)
        check(0 <= value < 1, f"optim.{beta}", f"Adam betas must be in [0, 1), got {value}")
    if o.schedule == "wsd":
        check(0 < o.decay_fraction <= 1, "optim.decay_fraction", f"must be in (0, 1], got {o.decay_fraction}")
        decay_steps = int(round(o.decay_fraction * t.steps))
        check(o.warmup_steps + decay_steps <= t.steps, "optim.decay_fraction",
              f"warmup ({o.warmup_steps}) + decay ({decay_steps}) steps exceed train.steps ({t.steps})")
    if t.grad_clip is not None:
        check(t.grad_clip > 0, "train.grad_clip", f"must be positive or null, got {t.grad_clip}")
    check(0 < cfg.data.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {cfg.data.val_fraction}")
    check(len(cfg.data.sources) > 0, "data.sources", "needs at least one source")
    for i, source in enumerate(cfg.data.sources):
        check(source.weight > 0, f"data.sources[{i}].weight", f"must be positive, got {source.weight}")
    check(cfg.data.workers >= 0, "data.workers", f"must be >= 0, got {cfg.data.workers}")
    check(cfg.data.prefetch >= 0, "data.prefetch", f"must be >= 0, got {cfg.data.prefetch}")
    for axis, size in cfg.mesh.axes.items():
        check(size == "local" or size >= 1 or size == -1, f"mesh.{axis}", f"must be a positive size or -1, got {size}")
    check(cfg.mesh.dcn_data >= 1 and cfg.mesh.dcn_fsdp >= 1, "mesh.dcn_data", "DCN factors must be >= 1")
    errors += _metap_errors(cfg)
    check(sum(size == -1 for size in cfg.mesh.axes.values()) <= 1, "mesh",
          "at most one mesh axis may be -1 (it absorbs the remaining devices)")
    return errors


def _vision_errors(v: VisionConfig) -> list[tuple[str, str]]:
    positive = [(f"vision.{key}", f"must be positive, got {getattr(v, key)}")
                for key in ("d_model", "n_layers", "n_heads", "d_ff", "image_size", "patch_size", "projector_dim")
                if getattr(v, key) <= 0]
    if positive:
        return positive
    errors = []
    if v.image_size % v.patch_size:
        errors.append(("vision.image_size", f"{v.image_size} is not a multiple of vision.patch_size ({v.patch_size})"))
    shuffled_side = v.grid * v.pixel_shuffle_ratio
    if not 0 < v.pixel_shuffle_ratio <= 1 or shuffled_side != int(shuffled_side):
        errors.append(("vision.pixel_shuffle_ratio", f"{v.pixel_shuffle_ratio} must shrink the {v.grid}x{v.grid} "
                                                     f"patch grid to a whole grid (an even grid for 0.5)"))
    if v.d_model % v.n_heads or (v.d_model // v.n_heads) % 4:
        errors.append(("vision.n_heads", f"head_dim = d_model / n_heads = {v.d_model}/{v.n_heads} must be a whole "
                                         f"multiple of 4 (the 2D rotary embedding turns quarters of it)"))
    if v.d_ff * v.pixel_shuffle_ratio ** 2 != v.d_model:
        errors.append(("vision.d_ff", f"{v.d_ff} must be d_model / pixel_shuffle_ratio^2 = "
                                      f"{v.d_model / v.pixel_shuffle_ratio ** 2:g}: the adapter reads the pixel-shuffled "
                                      f"features at that width"))
    return errors


def _metap_errors(cfg: Config) -> list[tuple[str, str]]:
    mp, m = cfg.metap, cfg.model
    errors = [(f"metap.base.{key}", f"must be positive or null, got {value}")
              for key, value in mp.base.model_dump().items() if value is not None and value <= 0]
    for key in ("init_std", "sigma_embedding", "sigma_hidden", "sigma_readout"):
        if getattr(mp, key) < 0:
            errors.append((f"metap.{key}", f"must be >= 0, got {getattr(mp, key)}"))
    if errors:
        return errors
    heads, kv = mp.base.n_heads or m.n_heads, mp.base.n_kv_heads or m.n_kv_heads
    if heads % kv:
        errors.append(("metap.base.n_kv_heads", f"the proxy's n_heads ({heads}) must be a multiple of its n_kv_heads ({kv})"))
    if mp.base.head_dim is None and m.head_dim is None and (mp.base.d_model or m.d_model) % heads:
        errors.append(("metap.base.n_heads", f"the proxy's d_model ({mp.base.d_model or m.d_model}) must be divisible by "
                                             f"its n_heads ({heads}); or set metap.base.head_dim"))
    return errors
