"""Every trial explained in optuna-dashboard: a learning-curve PNG, a confusion-matrix PNG and a Markdown note
(layer table, parameters, MACs, seconds per epoch, device, both images embedded), uploaded to the study's artifact
store while the trial is still RUNNING (optuna-dashboard refuses uploads to finished trials).

Costs (see benchmarks/README.md): one batch-1 forward pass with hooks and torch's FLOP counter before training,
and two small matplotlib figures plus a few storage writes when the trial ends; the confusion counts come from
``accuracy.accuracy_on``.
"""

from __future__ import annotations

import json
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
import torch.nn as nn
from optuna.artifacts import upload_artifact

from hpsearch.artifacts import store_location
from hpsearch.data import DataInfo
from hpsearch.spec import StudySpec
from hpsearch.train_types import Built, FitResult

# Optuna's ArtifactStore protocol lives in a private module: any object with open_reader/write/remove will do.
ArtifactStore = Any

@dataclass(frozen=True)
class Layer:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    trainable: bool
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    layers: tuple[Layer, ...]
    total_params: int
    trainable_params: int
    macs: int  # multiply-accumulates per image: every convolution and matrix product (FlopCounterMode's FLOPs / 2)


def summarize(model: nn.Module, *, channels: int, size: int | tuple[int, int]) -> ModelSummary:
    """Layer table and MACs of ``model`` from one batch-1 forward pass on the model's device (the CPU, before
    training), in eval mode, under inference_mode.

    The MACs are torch's FlopCounterMode count halved: every convolution and matrix product, the functional ones
    (``F.conv2d``, ``@``, attention) included. Element-wise work (residual additions, norms, activations, pooling)
    counts zero, as in thop and fvcore: a few percent of a conv's. The table has a row per call of a leaf module,
    its MACs what the count grew by during that call."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    table = _LayerTable(model, counter)
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode(), counter:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            h, w = (size, size) if isinstance(size, int) else size
            model(torch.zeros(1, channels, h, w, device=device))
    finally:
        table.remove()
        model.train(was_training)
    params = list(model.parameters())
    return ModelSummary(layers=tuple(table.rows), total_params=sum(p.numel() for p in params),
                        trainable_params=sum(p.numel() for p in params if p.requires_grad),
                        macs=counter.get_total_flops() // 2)


class _LayerTable:
    """Forward hooks on ``model``'s leaf modules: a Layer per call, with the MACs ``counter`` counted inside it."""

    def __init__(self, model: nn.Module, counter: Any) -> None:
        self.counter = counter
        self.rows: list[Layer] = []
        self._flops_before: list[int] = []  # a stack: a leaf module may call another module's forward
        self._hooks: list[Any] = []
        for name, module in model.named_modules():
            if not any(True for _ in module.children()):
                self._hooks.append(module.register_forward_pre_hook(self._enter))
                self._hooks.append(module.register_forward_hook(self._recorder(name or type(module).__name__)))

    def _enter(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self._flops_before.append(self.counter.get_total_flops())

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            flops = self.counter.get_total_flops() - self._flops_before.pop()
            shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
            params = list(module.parameters(recurse=False))
            self.rows.append(Layer(name=name, kind=type(module).__name__, output_shape=shape,
                                   params=sum(p.numel() for p in params),
                                   trainable=any(p.requires_grad for p in params), macs=flops // 2))
        return record

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def learning_curve_png(result: FitResult, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, safe off the main thread

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    epochs = list(range(1, len(result.train_loss) + 1))
    ax.plot(epochs, result.train_loss, "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax2 = ax.twinx()
    ax2.plot(epochs, result.val_accuracy, "s-", color="tab:orange", label="val accuracy")
    ax2.set_ylabel("val accuracy", color="tab:orange")
    if 0 <= result.best_epoch < len(epochs):
        ax2.axvline(result.best_epoch + 1, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(epochs)
    ax.set_title("learning curve")
    # Fixed margins, not tight_layout: measuring every label for the layout took half of the figure's ~110 ms.
    fig.subplots_adjust(left=0.12, bottom=0.15, right=0.87, top=0.9)
    fig.savefig(path, format="png")


def confusion_png(counts: list[list[int]], classes: tuple[str, ...], path: Path, *, epoch: int) -> None:
    from matplotlib.figure import Figure

    n = len(counts)
    side = min(10.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side, side), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    labels = list(classes) if len(classes) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"validation confusion at epoch {epoch + 1}")
    if n <= 20:  # beyond that the numbers no longer fit in their cells
        top = max(max(row) for row in counts) or 1
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                ax.text(j, i, str(c), ha="center", va="center", fontsize=8,
                        color="white" if c > top / 2 else "black")
    # Fixed margins that fit names as long as CIFAR-10's "automobile" (tight_layout: 190 ms against 107 ms).
    fig.subplots_adjust(left=0.19, bottom=0.19, right=0.97, top=0.94)
    fig.savefig(path, format="png")


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "-"


def images_line(location: str, host: str) -> str:
    """The note's line that says where the trial's images are kept (a copied database's dashboard cannot show them
    without that store) and how to point ``hpsearch dashboard`` at it."""
    where = f"`{location}`" if location.startswith("s3://") else f"`{location}` (host `{host}`)"
    return (f"- images: kept in {where}; where they do not show, start "
            "`hpsearch dashboard --artifacts <that store or a copy of it>`")


def trial_note(*, number: int, summary: ModelSummary | None, result: FitResult, device: str, complete: bool,
               images: dict[str, str], summary_error: str = "", images_kept: str = "") -> str:
    """The trial's Markdown note; ``images`` maps a caption to the artifact's dashboard URL path; ``images_kept`` is
    the ``images_line`` that says where they are kept."""
    spe = sum(result.seconds_per_epoch) / len(result.seconds_per_epoch) if result.seconds_per_epoch else 0.0
    state = "complete" if complete else f"pruned after {len(result.val_accuracy)} epochs"
    lines = [
        f"## Trial {number} ({state})",
        "",
        f"- best val accuracy **{result.best_val_accuracy:.4f}** at epoch {result.best_epoch + 1}",
    ]
    if summary is not None:
        lines += [f"- parameters: {summary.total_params:,} ({summary.trainable_params:,} trainable)",
                  f"- MACs per image: {summary.macs:,} (conv + linear)"]
    else:
        lines.append(f"- no layer table: {summary_error}")
    lines.append(f"- seconds per epoch: {spe:.2f} on `{device}`")
    if images and images_kept:
        lines.append(images_kept)
    lines.append("")
    for caption, url in images.items():
        lines += [f"![{caption}]({url})", ""]
    if summary is None:
        return "\n".join(lines) + "\n"
    lines += ["| layer | type | output shape | params | trainable |", "|---|---|---|---:|---|"]
    for r in summary.layers:
        state_ = ("trainable" if r.trainable else "frozen") if r.params else "-"
        lines.append(f"| {r.name} | {r.kind} | {_shape(r.output_shape)} | {r.params:,} | {state_} |")
    return "\n".join(lines) + "\n"


class TrialExplainer:
    """Made once per trial before training; ``observe`` sees every epoch's result; ``finish`` uploads."""

    def __init__(self, store: ArtifactStore, built: Built, info: DataInfo, *, device: torch.device) -> None:
        self.store, self.info, self.device = store, info, device
        self.result: FitResult | None = None
        size = built.input_size or (info.height, info.width)
        self.summary: ModelSummary | None = None
        self.summary_error = ""
        try:
            self.summary = summarize(built.model, channels=info.channels, size=size)
        except Exception as e:  # a model the hooks cannot follow still trains; its note says why it has no table
            self.summary_error = f"{type(e).__name__}: {e}"

    def observe(self, result: FitResult) -> None:
        self.result = result

    def finish(self, trial: optuna.Trial, *, complete: bool) -> None:
        """Uploads the PNGs and saves the note; a failure only warns (the trial's value matters more)."""
        result = self.result
        if result is None or not result.val_accuracy:
            return  # pruned before its first epoch ended: nothing to explain
        try:
            self._upload(trial, result, complete=complete)
        except Exception as e:  # an unreachable store must not fail a trained trial
            trial.set_user_attr("artifacts_error", f"{type(e).__name__}: {e}")
            warnings.warn(f"trial {trial.number}: artifacts not uploaded ({type(e).__name__}: {e})", stacklevel=2)

    def _upload(self, trial: optuna.Trial, result: FitResult, *, complete: bool) -> None:
        from optuna_dashboard import save_note
        from optuna_dashboard.artifact import get_artifact_path

        images: dict[str, str] = {}
        with tempfile.TemporaryDirectory(prefix="hpsearch-explain-") as tmp:
            curve = Path(tmp) / f"trial-{trial.number}-learning-curve.png"
            learning_curve_png(result, curve)
            files = [("learning curve", curve)]
            if complete and result.confusion is not None:
                conf = Path(tmp) / f"trial-{trial.number}-confusion.png"
                confusion_png(result.confusion, self.info.classes, conf, epoch=result.best_epoch)
                files.append(("confusion matrix", conf))
            for caption, path in files:
                artifact_id = upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial,
                                              mimetype="image/png")
                images[caption] = get_artifact_path(trial, artifact_id)
        save_note(trial, trial_note(number=trial.number, summary=self.summary, result=result,
                                    device=str(self.device), complete=complete, images=images,
                                    summary_error=self.summary_error,
                                    images_kept=images_line(store_location(self.store), socket.gethostname())))


def training_seconds_by_device(trials: list[optuna.trial.FrozenTrial]) -> dict[str, float]:
    """Training seconds of the finished trials (``report.training_seconds``) by the device they trained on (trial
    user attr ``device``; "unknown" where a trial has none), devices that trained none left out."""
    from hpsearch.report import training_seconds

    seconds: dict[str, float] = {}
    for t in trials:
        if t.state.is_finished():
            device = str(t.user_attrs.get("device", "unknown"))
            seconds[device] = seconds.get(device, 0.0) + training_seconds(t)
    return {d: s for d, s in sorted(seconds.items()) if s > 0}


def compute_line(seconds: dict[str, float]) -> str:
    """``- compute: N s of training in all (cpu: X s, cuda:0: Y s)``."""
    if not seconds:
        return "- compute: no training yet (no finished trial)"
    per = ", ".join(f"{d}: {s:,.1f} s" for d, s in seconds.items())
    return f"- compute: {sum(seconds.values()):,.1f} s of training in all ({per})"


def study_note(spec: StudySpec, *, artifacts: str | None, compute: dict[str, float] | None = None) -> str:
    """``compute``: training seconds by device (``training_seconds_by_device``); None leaves the line out."""
    lines = [
        f"## {spec.name}",
        "",
        f"- strategy: **{spec.strategy}**",
        f"- dataset: **{spec.dataset}**",
        f"- epochs per trial: {spec.epochs}; sampler {spec.sampler.get('type')}, pruner {spec.pruner.get('type')}",
    ]
    if compute is not None:
        lines.append(compute_line(compute))
    if artifacts is not None:
        lines.append(f"- trial artifacts: `{artifacts}`")
    lines += ["", "Study file (as stored on the study):", "", "```json", json.dumps(spec.to_dict(), indent=2), "```"]
    return "\n".join(lines) + "\n"


def save_study_note(study: optuna.Study, spec: StudySpec, *, artifacts: str | None) -> None:
    """Writes the study's note, with the training seconds of its finished trials so far, unless it already says the
    same (workers would otherwise each add a version)."""
    from optuna_dashboard import get_note, save_note

    body = study_note(spec, artifacts=artifacts,
                      compute=training_seconds_by_device(study.get_trials(deepcopy=False)))
    if get_note(study) != body:
        save_note(study, body)
