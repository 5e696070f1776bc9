"""The training-recipe schema: a spec's ``train:`` section and ``schedule:`` phases (what :mod:`peftc.train` reads)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from peftc.language.schema import RuleArgs, TensorArgs

__all__ = ["OnlineArgs", "OptimizerArgs", "Phase", "ReplayArgs", "SchedulerArgs", "StageDecl", "TrainSection"]


class Phase(RuleArgs):
    """One phase of a ``schedule:``: from fraction ``from`` of training on, only ``train`` learns.

    ``train`` is ``all`` (everything the rules train) or a list of selectors (with ``params`` patterns). A
    schedule only narrows what the rules made trainable; it never unfreezes what they froze.
    """

    from_: float = Field(alias="from", ge=0.0, lt=1.0)
    train: Annotated[
        Annotated[Literal["all"], Tag("all")] | Annotated[list[TensorArgs], Tag("selectors")],
        Discriminator(lambda v: "all" if isinstance(v, str) else "selectors"),
    ]
    label: str | None = None


class OptimizerArgs(RuleArgs):
    """``train.optimizer``: the torch optimizer and its own arguments (``lr`` and ``weight_decay`` sit apart).

    ``betas``/``eps`` belong to adam and adamw, ``momentum``/``nesterov``/``dampening`` to sgd; giving one to the
    other optimizer is an error, not a silently ignored key. The shorthand ``optimizer: adamw`` names one.
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    betas: tuple[float, float] | None = None
    eps: float | None = Field(default=None, gt=0)
    momentum: float | None = Field(default=None, ge=0)
    nesterov: bool | None = None
    dampening: float | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits(self) -> OptimizerArgs:
        own = {"adam": ("betas", "eps"), "adamw": ("betas", "eps"), "sgd": ("momentum", "nesterov", "dampening")}
        for key in ("betas", "eps", "momentum", "nesterov", "dampening"):
            if getattr(self, key) is not None and key not in own[self.name]:
                raise ValueError(f"{key!r} is not an argument of {self.name} (its arguments: "
                                 f"{', '.join(own[self.name])})")
        return self


class SchedulerArgs(RuleArgs):
    """``train.scheduler``: how the learning rate moves over the epochs (stepped every batch).

    ``constant``; ``step`` (× ``gamma`` every ``step_size`` epochs, torch's StepLR); ``cosine`` (to ``min_lr``
    × lr at the end). ``warmup_epochs`` ramps linearly from ``warmup_from`` × lr first; the step or cosine
    schedule then runs over the epochs after the warm-up. The shorthand ``scheduler: cosine`` names one.
    """

    name: Literal["constant", "step", "cosine"] = "constant"
    step_size: int | None = Field(default=None, ge=1)
    gamma: float = Field(default=0.1, gt=0)
    min_lr: float = Field(default=0.0, ge=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    warmup_from: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fits(self) -> SchedulerArgs:
        if self.name == "step" and self.step_size is None:
            raise ValueError("a step schedule needs step_size (epochs between decays)")
        if self.name != "step" and self.step_size is not None:
            raise ValueError(f"step_size belongs to the step schedule, not {self.name}")
        return self


class ReplayArgs(RuleArgs):
    """``train.replay``: the episodic memory of ``head: taer`` (task-aware experience replay).

    ``memory`` samples in all, shared equally by the classes seen so far; ``batch_size`` replayed samples per
    step (default: the training batch size); ``balance: task`` weighs the loss so that every seen task counts
    equally, ``none`` averages over samples, a number weighs the replay term against the current one.
    """

    memory: int = Field(default=2000, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    balance: Literal["task", "none"] | float = "task"


class OnlineArgs(RuleArgs):
    """``train.online``: online class-incremental learning (``peftc train DIR --stream``; docs/training.md).

    One pass over a task-free stream of ``batch_size`` images per step; ``memory`` replay samples kept by
    ``sampling`` (``reservoir``: Vitter's algorithm R; ``balanced``: class-balanced reservoir, Chrysakis & Moens
    2020); ``replay_batch_size`` of them (default: ``batch_size``) join every step. ``learner`` names a
    registered online learner (``er``, or a method's own) and ``args`` go to it. A stream file may override
    ``batch_size``, ``memory`` and ``sampling`` (they are the protocol a comparison keeps fixed).
    """

    learner: str = "er"
    batch_size: int = Field(default=10, ge=1)
    memory: int = Field(default=200, ge=1)
    sampling: Literal["reservoir", "balanced"] = "reservoir"
    replay_batch_size: int | None = Field(default=None, ge=1)
    args: dict[str, Any] = Field(default_factory=dict)


class StageDecl(RuleArgs):
    """One stage of a method's per-task training procedure (``train.stages``), run in order for every task.

    ``stage`` names a registered stage (``fit``, ``task_keys``, ``rectify_head``, ``distill``, …; see
    :mod:`peftc.train.stages`); ``epochs``, ``lr``, ``optimizer``, ``scheduler``, ``weight_decay`` override the
    recipe for this stage only, and ``args`` go to the stage itself.
    """

    stage: str
    label: str | None = None
    epochs: int | None = Field(default=None, ge=0)
    lr: float | None = Field(default=None, gt=0)
    optimizer: OptimizerArgs | None = None
    scheduler: SchedulerArgs | None = None
    weight_decay: float | None = Field(default=None, ge=0)
    args: dict[str, Any] = Field(default_factory=dict)


class TrainSection(RuleArgs):
    """``train:``: the method's published training recipe; ``peftc train`` follows it, its flags override it.

    ``lr`` is the learning rate at ``lr_batch`` samples per step when ``lr_batch`` is given (the linear scaling
    rule: the effective lr is ``lr × batch_size × accumulate / lr_batch``, the batch one optimizer step sees),
    else at any batch size. ``early_stop`` is the patience in epochs on validation accuracy (the best epoch is
    kept). ``stages`` empty = one ``fit`` stage.
    """

    optimizer: OptimizerArgs = Field(default_factory=OptimizerArgs)
    lr: float = Field(default=1e-3, gt=0)
    lr_batch: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    epochs: int = Field(default=10, ge=1)
    weight_decay: float = Field(default=0.0, ge=0)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    scheduler: SchedulerArgs = Field(default_factory=SchedulerArgs)
    early_stop: int | None = Field(default=None, ge=1)
    grad_clip: float | None = Field(default=None, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype (fp16 adds a GradScaler; CUDA only)
    accumulate: int = Field(default=1, ge=1)  # micro-batches per optimizer step: the effective batch is batch × N
    augment: Literal["standard", "light", "none"] = "standard"
    head: str = "task"  # a registered training head (peftc.train.heads): "task", or a method's own
    replay: ReplayArgs = Field(default_factory=ReplayArgs)
    stages: list[StageDecl] = Field(default_factory=list)
    online: OnlineArgs = Field(default_factory=OnlineArgs)

    def effective_lr(self, batch_size: int | None = None) -> float:
        """The learning rate for ``batch_size`` (default: the recipe's) under the scaling rule."""
        batch = (batch_size or self.batch_size) * self.accumulate
        return self.lr * batch / self.lr_batch if self.lr_batch else self.lr
