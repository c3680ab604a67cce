"""Online linear probe on the detached clean-view features of each training step."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from adios_pl.backend import pl
from adios_pl.callbacks.base import EvaluationCallback, batch_parts
from adios_pl.distributed import gather_in_order, gather_rows
from adios_pl.errors import ConfigurationError
from adios_pl.evaluation import seeded_linear
from adios_pl.nonfinite import StateSnapshot


class OnlineLinearProbe(EvaluationCallback):
    """A linear classifier trained beside the encoder on its detached features.

    Trains on the ``features``/``targets`` that :meth:`ADIOSModule.training_step` returns (no
    extra encoder forward; unlabelled targets -1 are left out) and logs ``val/linear_top1`` and
    ``val/linear_top5`` on the evaluation split (validation loader 0). Under DDP the features of
    all ranks are gathered, so every rank takes the same step and the weights stay identical.
    Weights and optimiser state are saved in checkpoints and restored on resume.

    With ``normalize`` (default) the features pass a ``BatchNorm1d`` without affine parameters
    before the linear layer (as MAE's linear probe). Without it, SGD at lr 0.1 with momentum
    diverges on a ResNet's features, whose squared norm is about 370 at initialisation (a small
    CNN's: about 22): on Shapes the probe's loss went from 1.5 to 20 within three epochs, with
    the normalisation it fell to 1.3.

    Args:
        num_classes: Number of classes of the labels.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        every_n_epochs: Evaluate on these epochs only (training continues every step).
        normalize: Standardise the features (running statistics) before the linear layer.
    """

    def __init__(self, num_classes: int, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0, every_n_epochs: int = 1,
                 normalize: bool = True) -> None:
        super().__init__(every_n_epochs)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = num_classes
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.normalize = normalize
        self.head: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self.trained_steps = 0
        self.labelled_images = torch.zeros((), dtype=torch.long)  # trained on, counted on the device
        self._labels_checked = False
        self._logits: list[Tensor] = []
        self._targets: list[Tensor] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Create the head (same seed on every rank) and its optimiser."""
        if self.head is not None:
            return
        d = int(getattr(pl_module, "encoder").num_features)
        linear = seeded_linear(d, self.num_classes, seed=0)
        head = nn.Sequential(nn.BatchNorm1d(d, affine=False), linear) if self.normalize else linear
        self.head = head.to(pl_module.device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self._pending_state is not None:
            self._restore(self._pending_state)

    @property
    def linear(self) -> nn.Linear | None:
        """The linear layer of the head (after the normalisation, if any)."""
        if self.head is None:
            return None
        return self.head[-1] if isinstance(self.head, nn.Sequential) else self.head  # type: ignore[return-value]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Move the head to the module's device (it is set up before the strategy moves the model)."""
        assert self.head is not None and self.optimizer is not None
        self.head.to(pl_module.device)
        for state in self.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, Tensor):
                    state[k] = v.to(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """One SGD step of the head on the step's detached clean-view features.

        No host synchronisation: unlabelled images (target -1) weigh zero in the loss, and a
        batch that ``nonfinite="skip"`` dropped (``outputs["finite"]`` false) is undone with
        ``torch.where``. The labels are checked against ``num_classes`` on the first batch only.
        """
        if not isinstance(outputs, dict) or "features" not in outputs:
            self._warn_once("outputs", "OnlineLinearProbe: training_step returned no 'features'; the probe is not trained")
            return
        features, targets = outputs["features"].detach(), outputs["targets"]
        features, targets = gather_rows(features), gather_rows(targets)
        if not self._labels_checked:  # once: a read-back
            self._labels_checked = True
            if int(targets.max()) >= self.num_classes:
                raise ConfigurationError(f"OnlineLinearProbe(num_classes={self.num_classes}) got label {int(targets.max())}; set num_classes to the number of classes of the data")
        assert self.head is not None and self.optimizer is not None
        finite = outputs.get("finite")
        snapshot = StateSnapshot(self.head, [self.optimizer]) if isinstance(finite, Tensor) else None
        labelled = targets >= 0
        self.head.train()
        with torch.enable_grad():
            per_image = F.cross_entropy(self.head(features.float()), targets.clamp(min=0), reduction="none")
            loss = (per_image * labelled).sum() / labelled.sum().clamp(min=1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        labelled_images = labelled.sum()
        if snapshot is not None:
            snapshot.restore_unless(finite)  # type: ignore[arg-type]
            labelled_images = torch.where(finite, labelled_images, 0)  # type: ignore[arg-type]
        self.labelled_images = self.labelled_images.to(labelled_images.device) + labelled_images
        self.trained_steps += 1
        pl_module.log("train/linear_loss", loss.detach(), on_step=True, on_epoch=False)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start collecting predictions."""
        self._logits, self._targets = [], []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Predict the evaluation split (loader 0)."""
        if dataloader_idx != 0 or not self._active(trainer):
            return
        assert self.head is not None
        _, targets, _ = batch_parts(batch)
        self.head.eval()
        with torch.no_grad():
            self._logits.append(self.head(outputs["features"].float()))
        self._targets.append(targets)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log top-1 and top-5 over the whole evaluation split (every rank's share, no padding)."""
        if not self._logits:
            return
        n = self._dataset_length(trainer, 0)
        logits = gather_in_order(torch.cat(self._logits), n)
        targets = gather_in_order(torch.cat(self._targets), n)
        self._logits, self._targets = [], []
        keep = targets >= 0
        untrained = self.trained_steps == 0 or int(self.labelled_images) == 0
        if untrained or not keep.any():
            # the same decision on every rank: the counts are of gathered batches, targets are gathered
            what = "no labelled training batch yet" if untrained else "no labelled evaluation image"
            self._warn_once(what, f"OnlineLinearProbe: {what}; val/linear_top1 is not logged")
            return
        if int(targets.max()) >= self.num_classes:
            raise ConfigurationError(f"OnlineLinearProbe(num_classes={self.num_classes}) got label {int(targets.max())} in the evaluation split")
        for k in (1, 5):  # with fewer than 5 classes top-5 is trivially 1
            acc = multiclass_accuracy(logits[keep], targets[keep], num_classes=self.num_classes, top_k=min(k, self.num_classes), average="micro")
            self._log_gathered(pl_module, f"val/linear_top{k}", acc)
        self._logits, self._targets = [], []

    def state_dict(self) -> dict[str, Any]:
        """Head weights and optimiser state, saved in the checkpoint."""
        if self.head is None or self.optimizer is None:
            return {}
        return {
            "head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(), "trained_steps": self.trained_steps,
            "labelled_images": int(self.labelled_images),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore on resume (deferred until the head exists)."""
        if not state_dict:
            return
        if self.head is None:
            self._pending_state = state_dict
        else:
            self._restore(state_dict)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.head is not None and self.optimizer is not None
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.trained_steps = int(state.get("trained_steps", 1))
        self.labelled_images = torch.tensor(int(state.get("labelled_images", self.trained_steps)), dtype=torch.long)
        self._pending_state = None
