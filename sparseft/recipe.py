"""Recipes: YAML read with OmegaConf (interpolation, key=value overrides, the CLI wins), validated once by pydantic into
frozen models with unknown keys forbidden, then passed around typed.

Help text lives once, in each field's description; `sparseft validate --explain` prints it from here.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from sparseft.errors import UserError
from sparseft.methods import MethodConfig
from sparseft.methods.base import method_config_classes

STABLE_KEYS = (
    "model.path", "data.train.path", "data.max_length", "method.name", "train.max_steps",
    "train.micro_batch_size", "train.lr", "train.seed", "train.output_dir",
)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    path: str = Field(description="Local directory of a Hugging Face causal LM, a .gguf file (dequantized on load, "
                                  "tokenizer from the file; needs sparseft[gguf]), or a hub id (only when online).")
    gguf_file: str | None = Field(None, description="With model.path a directory: the .gguf file in it to load.")
    tokenizer: str | None = Field(None, description="Tokenizer directory or hub id; defaults to model.path.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Storage dtype of the model's weights as loaded (the frozen weights keep it). What the "
                               "trainable weights live in is train.precision's choice.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model directory.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="Attention kernel passed to transformers: eager, sdpa or flash_attention_2 (needs CUDA and "
                          "the flash-attn package); null lets transformers pick.")

    @model_validator(mode="after")
    def _gguf_path(self):
        # Every loader reads model.path alone, so a directory + gguf_file resolves once, here, to the file itself.
        if self.gguf_file is not None and not self.path.lower().endswith(".gguf"):
            object.__setattr__(self, "path", str(Path(self.path) / self.gguf_file))
        return self


class DataFile(Section):
    path: str | None = Field(None, description="A local .jsonl, .json, .csv or .parquet file (or give hub).")
    hub: str | None = Field(None, description="A Hugging Face dataset id (org/name), read with datasets.load_dataset "
                            "(cached after the first download), or a directory written by save_to_disk.")
    split: str = Field("train", description="hub: the split to read.")
    subset: str | None = Field(None, description="hub: the dataset's configuration (subset) name.")
    revision: str | None = Field(None, description="hub: a branch, tag or commit of the dataset repository.")

    @model_validator(mode="after")
    def _one_source(self):
        from sparseft.data.hub import check_source

        check_source(self)
        return self


class DataSection(Section):
    train: DataFile = Field(description="Training data.")
    validation: DataFile | None = Field(None, description="Validation data; or use val_fraction.")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of train rows held out for validation.")
    format: Literal["text", "instruction", "chat", "completion"] = Field(
        "text",
        description="text: {text}; instruction: alpaca {instruction, input, output}; chat: {messages: [{role, content}]}"
        " (loss on assistant turns only); completion: {prompt, completion}. Prompt tokens never count in the loss.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns: {canonical_field: column_in_file}, e.g. {output: answer}.",
    )
    prompt_template: str | None = Field(
        None,
        description="instruction form: a template with {instruction} and {input}; the default is Alpaca's.",
    )
    max_length: int = Field(512, gt=0, description="Tokens per example; longer examples are truncated and counted.")
    packing: bool = Field(False, description="Pack several training examples into each row of max_length tokens; "
                          "no attention crosses an example boundary and positions restart at each example.")


class TrainSection(Section):
    output_dir: str = Field("runs/default", description="Run directory: recipe, metrics, checkpoints, final state.")
    max_steps: int = Field(gt=0, description="Optimizer steps.")
    micro_batch_size: int = Field(1, gt=0, description="Examples per forward pass.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(gt=0, description="Peak learning rate.")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="adamw, or sgd (with momentum).")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay on matrices (not biases or norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr over these steps.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="linear/cosine decay ends at lr * min_lr_ratio.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    seed: int = Field(0, description="Seeds data order, initialisation and selection.")
    gradient_checkpointing: bool = Field(False, description="Recompute block activations in backward.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
        description="auto (this rank's GPU when there is one, else the CPU), cpu, cuda or cuda:N. Launched ranks "
                    "(--nproc) always take their local rank's device.")
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"] = Field(
        "auto",
        description="fp32; bf16-mixed (trainable weights and optimizer state in fp32, forward and backward under bf16 "
                    "autocast); bf16-true (everything in bf16, no fp32 copies: small updates round away); fp16-mixed "
                    "(fp16 autocast with a gradient scaler); auto: bf16-mixed when model.dtype is bfloat16, "
                    "fp16-mixed when it is float16, else fp32.")
    log_every: int = Field(1, gt=0, description="Write a metrics line every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Validation loss every N steps (needs validation data).")
    eval_batches: int | None = Field(None, gt=0, description="Cap validation at N batches; null uses all.")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(2, gt=0, description="Newest checkpoints kept.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A step whose loss or gradient norm is not finite: stop (exit 1, nothing of it saved) or "
        "skip (drop its update, count it in metrics.jsonl).")
    max_skipped_steps: int = Field(10, gt=0, description="on_nonfinite=skip: stop after this many skipped steps in a "
                                   "row.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers that get the metrics, the recipe and the eval results "
        "besides metrics.jsonl: tensorboard, wandb, mlflow (each an extra: pip install 'sparseft[NAME]').")


class DistributedSection(Section):
    config: str | dict[str, Any] | None = Field(
        None, description="DeepSpeed config: a JSON path (e.g. configs/zero2.json) or an inline mapping."
    )


class EvalSection(Section):
    data: str | None = Field(None, description="Data file whose perplexity is scored (in data.format) with the tasks.")
    tasks: list[str] = Field(default_factory=list, description="Task YAML files (e.g. recipes/tasks/arith_em.yaml) "
                             "scored after the last step, written to eval.json in the run directory.")
    every: int | None = Field(None, gt=0, description="Also score the tasks every N steps (logged to metrics.jsonl).")


class _RecipeBase(Section):
    model: ModelSection
    data: DataSection
    train: TrainSection
    distributed: DistributedSection | None = None
    eval: EvalSection | None = None


@lru_cache(maxsize=1)
def recipe_model() -> type[_RecipeBase]:
    """The Recipe model, its `method` a union of every registered method's config keyed on `name`."""
    classes = tuple(method_config_classes())
    method_type = Annotated[Union[classes], Field(discriminator="name")] if len(classes) > 1 else classes[0]
    return create_model("Recipe", __base__=_RecipeBase, method=(method_type, ...))


# For type hints: every recipe is an instance of recipe_model(), which subclasses this.
Recipe = _RecipeBase


def _loc(loc: tuple, data: dict) -> str:
    parts = list(loc)
    # A tagged union adds the tag to the path (method.lora.rank): drop it so the path is the user's key.
    if len(parts) > 1 and parts[0] == "method" and isinstance(data.get("method"), dict) \
            and parts[1] == data["method"].get("name"):
        del parts[1]
    return ".".join(str(p) for p in parts)


def _problems(err: ValidationError, data: dict) -> list[str]:
    out = []
    for e in err.errors():
        key = _loc(e["loc"], data)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `sparseft validate --explain` lists the keys)"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown method {e['input'].get('name')!r} (known: {e['ctx']['expected_tags']})" \
                if isinstance(e.get("input"), dict) else msg
        elif e["type"] == "union_tag_not_found":
            key = "method.name"
            msg = "missing: every recipe names its method"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        out.append(f"{key or '<recipe>'}: {msg}")
    return out


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, interpolate, override and validate a recipe. Every problem is reported at once as a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path}: no such file")
    try:
        base = OmegaConf.load(path)
    except Exception as e:  # yaml errors carry line numbers in their text
        raise UserError(f"recipe {path}: not valid YAML: {e}") from None
    if not OmegaConf.is_dict(base):
        raise UserError(f"recipe {path}: must be a mapping of sections (model, data, method, train)")
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise UserError(f"override {bad[0]!r}: expected key=value, e.g. train.lr=1e-4")
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
        data = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise UserError(f"recipe {path}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None
    return validate_recipe_data(data, source=str(path))


def validate_recipe_data(data: Any, source: str = "recipe") -> Recipe:
    from sparseft.train.precision import check_precision

    try:
        recipe = recipe_model().model_validate(data)
    except ValidationError as e:
        problems = _problems(e, data if isinstance(data, dict) else {})
        raise UserError(f"{source}: {len(problems)} problem(s)", problems) from None
    problem = check_precision(recipe.train.precision, recipe.model.dtype)
    if problem:
        raise UserError(f"{source}: 1 problem(s)", [problem])
    return recipe


def recipe_to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(recipe.model_dump(mode="json")))


def explain() -> list[tuple[str, str, str]]:
    """(key path, default, description) for every recipe key, read from the field descriptions."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str):
        for name, f in model.model_fields.items():
            ann = f.annotation
            sub = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                       None)
            if sub is not None and not issubclass(sub, MethodConfig):
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            rows.append((prefix + name, default, f.description or ""))

    walk(_RecipeBase, "")
    for cls in method_config_classes():
        tag = cls.model_fields["name"].default
        for name, f in cls.model_fields.items():
            if name == "name":
                continue
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            rows.append((f"method.{name}  [{tag}]", default, f.description or ""))
    return rows
