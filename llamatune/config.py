"""Recipe configs: YAML in, typed nested dataclasses out.

The dataclasses below are the schema. A recipe YAML only supplies values; every key it
names must exist here (unknown keys are errors with a did-you-mean), every value must
have the declared type, and every problem found is reported in one message naming the
key as typed and the YAML line where it sits.

This module imports nothing else from llamatune, so any layer may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PIPELINE_STAGES",
    "STAGES",
    "TRAIN_STAGES",
    "Config",
    "ConfigError",
    "DPOConfig",
    "DataConfig",
    "PPOConfig",
    "LoraConfig",
    "ModelConfig",
    "RewardConfig",
    "StageSpec",
    "TrainConfig",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "save_config",
]


class ConfigError(ValueError):
    """One or more problems in a recipe config; the message lists all of them."""


def _choice(*values: str) -> dict:
    return {"choices": values}


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    path: str = "smollm2-135m-instruct"
    """Local HF folder, ``.gguf`` file, hub id already in the local cache, or a built-in name."""
    tokenizer: str | None = None
    """Take the tokenizer from this folder instead of ``model.path``."""
    dtype: str = field(default="auto", metadata=_choice("auto", "float32", "bfloat16", "float16"))
    """Weight dtype. ``auto``: bfloat16 on GPUs and CPUs with native bf16 (AVX512-BF16, AMX), else float32."""
    quantization: str = field(default="none", metadata=_choice("none", "8bit", "4bit"))
    """Load the frozen base in 8-bit or 4-bit (nf4 with double quantization) via bitsandbytes."""
    compute_dtype: str = field(
        default="auto", metadata=_choice("auto", "float32", "bfloat16", "float16")
    )
    """Matmul dtype for 4-bit layers. ``auto`` follows ``model.dtype``."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% more compute."""
    fused: bool = True
    """Lean LoRA, SwiGLU and loss kernels (plain PyTorch, exact): about half the activation
    memory of peft's modules with LoRA dropout, and faster. ``false`` runs peft and transformers
    as they are."""
    attn_implementation: str = field(default="sdpa", metadata=_choice("sdpa", "eager"))
    """Attention kernel."""
    trust_remote_code: bool = False
    """Allow custom modelling code from the model folder. Off unless you trust it."""
    adapter: str | None = None
    """Start from this run directory's adapter (for example an SFT run feeding the RM stage)."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks.

        Returns:
            ``(key, message)`` pairs, empty when the section is valid.
        """
        out = []
        if not self.path:
            out.append(("model.path", "must not be empty"))
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            out.append(("model.device", f"{dev!r} is not one of auto, cpu, cuda, cuda:N"))
        return out


@dataclass
class LoraConfig:
    """The LoRA adapter trained on the frozen base."""

    enabled: bool = True
    """Train a LoRA adapter. ``false`` trains the full model (small models only)."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32.0
    """Scaling numerator: the update is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``all-linear`` for every linear layer of the blocks."""
    use_rslora: bool = False
    """Rank-stabilized scaling ``alpha / sqrt(r)``."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks.

        Returns:
            ``(key, message)`` pairs, empty when the section is valid.
        """
        out = []
        if self.r <= 0:
            out.append(("lora.r", f"must be a positive integer, got {self.r}"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("lora.dropout", f"must be in [0, 1), got {self.dropout}"))
        if isinstance(self.target_modules, list) and not self.target_modules:
            out.append(("lora.target_modules", "must name at least one module or be all-linear"))
        return out


@dataclass
class DataConfig:
    """Where the data is, what shape it has and how it is rendered."""

    path: str = ""
    """A file (.jsonl, .json, .csv, .parquet) or a folder of them."""
    format: str = field(
        default="alpaca", metadata=_choice("alpaca", "sharegpt", "messages", "preference", "prompts")
    )
    """Record shape."""
    template: str = "alpaca"
    """Chat template name (``llamatune ls --templates`` lists them)."""
    system: str | None = None
    """System prompt for conversations that have none (``null``: the template's default)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Field-name remapping, canonical name to the name in your file, e.g. ``{output: response}``."""
    eval_path: str | None = None
    """A separate evaluation file. Without it, ``data.eval_split`` is held out of ``data.path``."""
    eval_split: float = 0.05
    """Fraction (below 1) or count (1 and up) of records held out for evaluation; 0 disables."""
    eval_group_by: str | None = None
    """Hold out whole groups (rows sharing this field, such as ``topic``) rather than rows."""
    holdout_topics: list[str] = field(default_factory=list)
    """Rows whose ``topic`` field is one of these are set aside: neither trained on nor in the
    eval split. A pipeline gives every stage the same list, so its held-out check asks the
    final model about subjects no stage saw."""
    max_samples: int | None = None
    """Use at most this many training records (after the split)."""
    truncation: str = field(default="truncate", metadata=_choice("truncate", "drop"))
    """Over-long samples: cut on the response side, or drop them."""
    cache: bool = True
    """Cache tokenized samples keyed by data, tokenizer, template and length."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks.

        Returns:
            ``(key, message)`` pairs, empty when the section is valid.
        """
        out = []
        if not self.path:
            out.append(("data.path", "is required: the training data file or folder"))
        if self.eval_split < 0:
            out.append(("data.eval_split", f"must be >= 0, got {self.eval_split}"))
        return out


@dataclass
class TrainConfig:
    """The optimization loop."""

    max_steps: int | None = 0
    """Optimizer steps to run; 0, -1 or null: no step cap, ``train.epochs`` full passes."""
    epochs: float = 1.0
    """Passes over the training data (used when ``train.max_steps`` is 0)."""
    batch_size: int = 4
    """Samples per micro-batch. Raise on a GPU (memory grows linearly)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. Effective batch = batch_size * grad_accum."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and norms)."""
    warmup_steps: int = 0
    """Linear warmup steps (``train.warmup_ratio`` wins when set)."""
    warmup_ratio: float = 0.0
    """Warmup as a fraction of total steps."""
    schedule: str = field(default="cosine", metadata=_choice("cosine", "linear", "constant"))
    """Decay after warmup."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables."""
    max_length: int = 512
    """Tokens per sample (and per packed row)."""
    packing: bool = False
    """Pack samples into ``max_length`` rows; attention never crosses sample boundaries."""
    group_by_length: bool = True
    """Batch samples of similar length together (shuffled in chunks), so little is padded."""
    seed: int = 42
    """Seeds data order, adapter init and dropout."""
    log_every: int = 1
    """Write a metrics row every N optimizer steps."""
    eval_every: int = 0
    """Evaluate every N steps; 0 evaluates only at the end."""
    save_every: int = 0
    """Write ``checkpoint-STEP/`` every N steps; 0 writes none (the final adapter is always saved)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints."""
    progress: bool = True
    """Show the progress bar."""
    alarms: bool = True
    """Training-health alarms (:mod:`llamatune.health`: negative KL, entropy or length
    collapse, DPO chosen rewards falling, accuracy at chance, eval loss rising): each printed
    once when it trips and recorded as a ``metrics.jsonl`` row; ``false`` turns them off."""
    report_to: list[str] | str = field(default_factory=list)
    """Trackers that also get every metrics row: ``tensorboard``, ``wandb``, ``trackio`` (one
    name or a list; off by default). ``metrics.jsonl`` is written either way."""

    @property
    def trackers(self) -> list[str]:
        """``train.report_to`` as a list of names (``none`` and ``[]`` mean none)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to)
        return [n for n in names if n not in ("none", "")]

    @property
    def step_cap(self) -> int:
        """``train.max_steps`` as a number of steps, 0 when there is no cap (0, -1 or null)."""
        return self.max_steps if self.max_steps and self.max_steps > 0 else 0

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks.

        Returns:
            ``(key, message)`` pairs, empty when the section is valid.
        """
        out = []
        for key in ("batch_size", "grad_accum", "max_length", "log_every"):
            if getattr(self, key) < 1:
                out.append((f"train.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.max_steps is not None and self.max_steps < -1:
            out.append(("train.max_steps", f"must be >= 0 (or -1/null for no step cap), got "
                        f"{self.max_steps}"))
        for key in ("eval_every", "save_every", "warmup_steps", "keep_checkpoints"):
            if getattr(self, key) < 0:
                out.append((f"train.{key}", f"must be >= 0, got {getattr(self, key)}"))
        if not self.step_cap and self.epochs <= 0:
            out.append(("train.epochs", "must be > 0 when train.max_steps is 0"))
        if self.lr <= 0:
            out.append(("train.lr", f"must be > 0, got {self.lr}"))
        if not 0 <= self.warmup_ratio < 1:
            out.append(("train.warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"))
        for name in self.trackers:
            if name not in TRACKERS:
                out.append(("train.report_to", f"{name!r} is not a tracker; use "
                            f"{', '.join(TRACKERS)} (or none)"))
        return out


TRACKERS = ("tensorboard", "wandb", "trackio")
"""What ``train.report_to`` may name."""


@dataclass
class RewardConfig:
    """Reward-model stage settings (``llamatune rm``)."""

    margin: float = 0.0
    """Margin in ``-log sigmoid(r_chosen - r_rejected - margin)``; 0 disables."""
    center_coef: float = 0.0
    """Weight of a penalty on the squared mean reward (keeps scores centred near 0)."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks.

        Returns:
            ``(key, message)`` pairs, empty when the section is valid.
        """
        return [] if self.center_coef >= 0 else [("reward.center_coef", "must be >= 0")]


@dataclass
class DPOConfig:
    """Direct preference optimization settings (``llamatune dpo``)."""

    beta: float = 0.1
    """Strength of the pull towards the reference: the implicit reward is
    ``beta * (log p_policy - log p_ref)``."""
    loss: str = field(default="sigmoid", metadata=_choice("sigmoid", "ipo", "hinge"))
    """``sigmoid`` (DPO), ``ipo`` (squared, on per-token averaged log-ratios), ``hinge`` (SLiC)."""
    label_smoothing: float = 0.0
    """Conservative DPO: the probability that a pair's label is flipped (``sigmoid`` only)."""
    precompute_ref: bool = False
    """Compute the reference log-probs once before training instead of at every step."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks.

        Returns:
            ``(key, message)`` pairs, empty when the section is valid.
        """
        out = []
        if self.beta <= 0:
            out.append(("dpo.beta", f"must be > 0, got {self.beta}"))
        if not 0.0 <= self.label_smoothing < 0.5:
            out.append(("dpo.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"))
        if self.label_smoothing and self.loss != "sigmoid":
            out.append(("dpo.label_smoothing", f"applies to dpo.loss=sigmoid only, not "
                        f"{self.loss}"))
        return out


@dataclass
class PPOConfig:
    """Reinforcement learning from a reward (``llamatune ppo``): PPO, or RLOO/GRPO."""

    advantage: str = field(default="gae", metadata=_choice("gae", "rloo", "grpo"))
    """``gae``: PPO with a value head and generalized advantage estimation; ``rloo`` and
    ``grpo``: no critic, each completion measured against the other ``ppo.k`` of its prompt."""
    reward_model: str | None = None
    """A reward-model run directory (the output of ``llamatune rm``)."""
    reward_fn: str | None = None
    """A Python reward, ``module:function`` (or ``path/to/file.py:function``), called as
    ``function(prompts, responses, **fields) -> list[float]``."""
    rollout_batch: int = 8
    """Prompts per iteration (each sampled ``ppo.k`` times)."""
    k: int = 1
    """Completions per prompt (2 or more for ``rloo`` and ``grpo``)."""
    epochs: int = 1
    """PPO epochs over each rollout batch (mini-batches of ``train.batch_size`` sequences)."""
    max_new_tokens: int = 64
    """Longest response; one that reaches it without the template's end token is truncated."""
    temperature: float = 1.0
    """Sampling temperature; the training forwards divide the logits by it too."""
    top_p: float = 1.0
    """Nucleus sampling."""
    kl_coef: float = 0.05
    """Weight of the per-token KL penalty against the reference in the reward."""
    kl_target: float | None = None
    """Adaptive KL coefficient: steer the mean KL towards this (``null``: fixed coefficient)."""
    kl_horizon: int = 10000
    """How fast the adaptive coefficient moves (in sequences)."""
    kl_loss_coef: float = 0.0
    """Weight of a KL term against the reference in the policy loss (the ``k3`` estimator, as in
    GRPO), an anchor that keeps sampling close to the starting model; unlike ``kl_coef`` it
    leaves the reward alone, so the one-pass update (see ``epochs``) still holds."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the policy loss (mean entropy per response token, in
    nats): keeps the policy exploring, so a prompt's ``k`` answers keep disagreeing."""
    max_kl: float | None = None
    """Stop the run (keeping the last checkpoint) when an iteration's mean KL exceeds this."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """GAE's lambda."""
    cliprange: float = 0.2
    """Clip of the policy ratio."""
    cliprange_value: float = 0.2
    """Clip of the value update around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch whose mean ratio exceeds this (a broken or stale mini-batch)."""
    missing_eos_penalty: float | None = None
    """Added to the reward of a response that ends without the template's end token."""
    reward_clip: float | None = None
    """Clip rewards to ``[-reward_clip, reward_clip]``."""
    reward_norm: bool = False
    """Normalize rewards by the running mean and standard deviation."""
    sample_every: int = 10
    """Write sample responses to ``samples.jsonl`` every N iterations (0: never)."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks.

        Returns:
            ``(key, message)`` pairs, empty when the section is valid.
        """
        out = []
        for key in ("rollout_batch", "k", "epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, key) < 1:
                out.append((f"ppo.{key}", f"must be >= 1, got {getattr(self, key)}"))
        if self.advantage in ("rloo", "grpo") and self.k < 2:
            out.append(("ppo.k", f"must be >= 2 for ppo.advantage={self.advantage} (it compares "
                        f"the completions of a prompt), got {self.k}"))
        if self.temperature <= 0:
            out.append(("ppo.temperature", f"must be > 0, got {self.temperature}"))
        if not 0 < self.top_p <= 1:
            out.append(("ppo.top_p", f"must be in (0, 1], got {self.top_p}"))
        for key in ("kl_coef", "kl_loss_coef", "entropy_coef"):
            if getattr(self, key) < 0:
                out.append((f"ppo.{key}", f"must be >= 0, got {getattr(self, key)}"))
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                out.append((f"ppo.{key}", f"must be in [0, 1], got {getattr(self, key)}"))
        for key in ("cliprange", "cliprange_value", "ratio_threshold"):
            if getattr(self, key) <= 0:
                out.append((f"ppo.{key}", f"must be > 0, got {getattr(self, key)}"))
        return out


@dataclass(frozen=True)
class StageSpec:
    """One training stage of the registry (:data:`TRAIN_STAGES`)."""

    module: str
    """The module whose ``main(cfg, recipe_path)`` runs it."""
    data: str
    """The kind of data it reads (``conversations``, ``pairs``, ``prompts``)."""
    folder: str
    """Its folder in a pipeline's output directory."""
    help: str
    """One line for ``llamatune --help``."""


TRAIN_STAGES = {
    "sft": StageSpec("llamatune.recipes.sft", "conversations", "sft",
                     "supervised fine-tuning on conversations"),
    "rm": StageSpec("llamatune.recipes.reward", "pairs", "reward",
                    "reward model on preference pairs"),
    "dpo": StageSpec("llamatune.recipes.dpo", "pairs", "dpo",
                     "DPO on preference pairs (the offline alternative to RM+PPO)"),
    "ppo": StageSpec("llamatune.recipes.ppo", "prompts", "ppo",
                     "PPO (or RLOO/GRPO) against a reward model or a reward rule"),
}
"""The stage registry: every training command, read by the CLI, the pipeline and recipes."""

PIPELINE_STAGES = ("sft", "rm", "ppo")
"""The training stages ``llamatune pipeline`` runs, in order."""

STAGES = (*TRAIN_STAGES, "pipeline")
"""The stage commands a recipe can name in its ``stage:`` key."""


@dataclass
class Config:
    """A whole recipe config."""

    stage: str | None = field(default=None, metadata=_choice(*STAGES))
    """The stage this recipe is for (``sft``, ``rm``, ``dpo``, ``ppo``, ``pipeline``); the
    stage commands fill it in when it is missing, ``validate`` and ``preview`` need it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    output_dir: str = "runs/default"
    """The run directory."""
    resume: bool = False
    """Continue from the newest complete ``checkpoint-STEP/`` in ``output_dir``."""
    resume_accept_changes: bool = False
    """Resume even though the recipe changed what each step sees (batch size, seed, length,
    the data). Off: such a resume is refused, naming what changed."""
    overwrite: bool = False
    """Allow writing into a non-empty ``output_dir`` that holds a finished run."""

    def problems(self) -> list[tuple[str, str]]:
        """Cross-field checks over all sections.

        Returns:
            ``(key, message)`` pairs, empty when the config is valid.
        """
        out = []
        for sec in (self.model, self.lora, self.data, self.train, self.reward, self.dpo,
                    self.ppo):
            out.extend(sec.problems())
        if not self.output_dir:
            out.append(("output_dir", "must not be empty"))
        if not self.lora.enabled and self.model.quantization != "none":
            out.append(("lora.enabled", f"is false: that trains every weight, which a "
                        f"{self.model.quantization} base cannot do; set lora.enabled=true or "
                        "model.quantization=none"))
        if self.stage == "ppo" and (self.ppo.reward_model is None) == (self.ppo.reward_fn is None):
            out.append(("ppo.reward_model", "or ppo.reward_fn: set exactly one (a reward-model "
                        "run directory, or a module:function reward)"))
        if not self.lora.enabled and self.model.dtype in ("bfloat16", "float16"):
            out.append(("model.dtype", f"is {self.model.dtype}, but lora.enabled=false trains "
                        "every weight and trainable weights keep float32 master weights; use "
                        "model.dtype=auto or float32"))
        return out


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _all_keys(cls=Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted key the schema accepts, mapped to its annotation."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys.update(_all_keys(hint, f"{prefix}{f.name}."))
        else:
            keys[f"{prefix}{f.name}"] = (hint, f)
    return keys


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        item = _type_name(typing.get_args(hint)[0])  # "a string" -> "a list of strings"
        return "a list of " + item.split(" ", 1)[-1] + "s"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        hint, "null" if hint is type(None) else str(hint)
    )


def _coerce(value, hint):
    """Return ``value`` as ``hint`` or raise ``TypeError``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if hint is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, inner) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return {str(k): str(v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "2e-4" as a string; accept it as the number it obviously is.
                number = float(value)
            except ValueError:
                raise TypeError from None
        else:
            raise TypeError
        if not math.isfinite(number):
            raise TypeError
        return number
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    raise TypeError


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key in _SECTIONS:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _yaml_key_lines(text: str) -> dict[str, int]:
    """Map dotted keys to 1-based line numbers in the YAML text (best effort)."""
    lines: dict[str, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                if prefix == "" and isinstance(v, yaml.MappingNode):
                    walk(v, key + ".")

    if root is not None:
        walk(root, "")
    return lines


def _read_yaml(p: Path) -> tuple[dict, str]:
    """The recipe as a mapping, and its text; every way a file can be wrong is a ConfigError."""
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}:{line}: not UTF-8 text; a recipe is a YAML file (`llamatune cp "
                          "alpaca my.yaml` copies one to start from)") from None
    except OSError as e:
        raise ConfigError(f"recipe {p} cannot be read ({e.strerror})") from None
    if not text.strip():
        raise ConfigError(f"{p} is empty; a recipe is a YAML mapping of sections (model, lora, "
                          "data, train) to keys (`llamatune cp alpaca my.yaml` copies one)")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{p}:{mark.line + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e)
        tab = "\t" in problem or "'\\t'" in problem  # PyYAML writes the tab as '\t'
        hint = "; YAML indents with spaces, never tabs" if tab else ""
        raise ConfigError(f"{at}: not valid YAML ({problem}){hint}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid YAML (nested too deeply)") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        kind = "a list" if isinstance(raw, list) else f"a single {type(raw).__name__} value"
        raise ConfigError(f"{p}: the recipe is {kind}; a recipe must be a YAML mapping of "
                          "sections to keys (model:, data:, train: ...)")
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{p}: {bad[0]!r} is not a recipe key (keys are names such as "
                          "model or train)")
    return raw, text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``section.key=value`` strings; values are read as YAML scalars or lists.

    Args:
        items: Strings as typed on the command line.

    Returns:
        Dotted key to value.

    Raises:
        ConfigError: An item has no ``=``.
    """
    out: dict[str, Any] = {}
    bad = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            bad.append(f"override {item!r} is not key=value (for example train.max_steps=10)")
            continue
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else ""
        except (yaml.YAMLError, RecursionError):
            out[key.strip()] = raw
    if bad:
        raise ConfigError("; ".join(bad))
    return out


def read_recipe(path: str | os.PathLike) -> tuple[dict, dict[str, int]]:
    """A recipe file as a mapping, and the line of each dotted key (for messages).

    Raises:
        ConfigError: The file is missing, not UTF-8, not YAML or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {path} does not exist. `llamatune ls` lists the shipped "
                          "recipes; `llamatune cp NAME my.yaml` copies one to edit.")
    raw, text = _read_yaml(p)
    return raw, _yaml_key_lines(text)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested recipe sections as dotted keys (``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``)."""
    return _flatten(tree, prefix)


def load_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None,
                label: str = "override ") -> Config:
    """Read a recipe YAML, apply overrides, validate everything.

    Args:
        path: The recipe YAML, or ``None`` to start from defaults.
        overrides: ``section.key=value`` strings or an already parsed dotted-key dict.
        label: What messages put before an override's key (a pipeline names its recipe and
            stage here).

    Returns:
        The validated config.

    Raises:
        ConfigError: With every problem found, each naming its key (and YAML line).
    """
    raw: dict = {}
    where = "overrides"
    lines: dict[str, int] = {}
    if path is not None:
        p = Path(path)
        where = str(path)
        if not p.is_file():
            raise ConfigError(
                f"recipe {path} does not exist. `llamatune ls` lists the shipped recipes; "
                "`llamatune cp NAME my.yaml` copies one to edit."
            )
        raw, text = _read_yaml(p)
        lines = _yaml_key_lines(text)
    ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})

    def at(key: str, source: str) -> str:
        if source == "yaml":
            return f"{where}:{lines[key]}: {key}" if key in lines else f"{where}: {key}"
        return f"{label}{key}"

    schema = _all_keys()
    values: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    for key, v in _flatten(raw).items():
        values[key] = (v, "yaml")
    for key, v in ov.items():
        values[key] = (v, "override")
    kwargs: dict[str, dict] = {name: {} for name in _SECTIONS}
    for key, (v, source) in values.items():
        if key not in schema:
            if key in _SECTIONS:
                problems.append(f"{at(key, source)} must be a mapping of keys")
                continue
            guess = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
            hint = f"; did you mean {guess[0]}?" if guess else ""
            problems.append(f"{at(key, source)} is not a recipe key{hint}")
            continue
        hint, f = schema[key]
        try:
            val = _coerce(v, hint)
        except TypeError:
            problems.append(f"{at(key, source)} must be {_type_name(hint)}, got {v!r}")
            continue
        choices = f.metadata.get("choices")
        if choices and val is not None and val not in choices:
            guess = difflib.get_close_matches(str(val), choices, n=1)
            hint_s = f"; did you mean {guess[0]}?" if guess else ""
            problems.append(
                f"{at(key, source)} is {val!r}, not one of {', '.join(choices)}{hint_s}"
            )
            continue
        section, _, name = key.rpartition(".")
        if section:
            kwargs[section][name] = val
        else:
            kwargs[name] = val  # type: ignore[assignment]
    top = {k: v for k, v in kwargs.items() if not isinstance(v, dict) or k not in _SECTIONS}
    hints = typing.get_type_hints(Config)
    sections = {k: hints[k](**kwargs[k]) for k in _SECTIONS if dataclasses.is_dataclass(hints[k])}
    cfg = Config(**sections, **top)
    problems += [f"{at(k, values[k][1]) if k in values else k} {msg}" for k, msg in cfg.problems()]
    if problems:
        raise ConfigError(_join(problems))
    return cfg


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config: " + "; ".join(problems)


def config_to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (everything, defaults included)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
