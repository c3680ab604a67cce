"""Host time of Lightning's ``self.log`` in the training step.

Each ``self.log`` call updates Lightning's result collection, which moves the stored metric to
the value's device by rebuilding it (a deep copy of its metadata) whether or not it is already
there: host time that a launch-bound GPU step pays on every batch. This times ``log_dict``
(and the progress bar's ``log``) in a real CPU training run of a small ADIOS model, logging every
batch, and prints the milliseconds per step and per value. On an accelerator ``ADIOSModule``
logs only every ``log_every_n_steps`` batches, when Lightning's loggers write.

    python benchmarks/log_cost.py
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from adios_pl import ADIOSModule


class TimedLogs(ADIOSModule):
    """ADIOSModule that adds up the time spent in ``log_dict`` and ``log`` (calls from inside
    ``log_dict`` counted once)."""

    seconds = 0.0
    values = 0
    _depth = 0

    def _timed(self, method: Any, *args: Any, **kwargs: Any) -> None:
        TimedLogs._depth += 1
        start = time.perf_counter()
        try:
            method(*args, **kwargs)
        finally:
            TimedLogs._depth -= 1
            if TimedLogs._depth == 0:
                TimedLogs.seconds += time.perf_counter() - start

    def log_dict(self, *args: Any, **kwargs: Any) -> None:
        self._timed(super().log_dict, *args, **kwargs)

    def log(self, *args: Any, **kwargs: Any) -> None:
        TimedLogs.values += 1
        self._timed(super().log, *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.manual_seed(0)
    images = torch.randn(4 * args.steps, 3, 16, 16)
    data = TensorDataset(images, images.flip(-1), torch.zeros(len(images), dtype=torch.long))
    loader = DataLoader(data, batch_size=4, collate_fn=lambda items: ((torch.stack([i[0] for i in items]),
                                                                        torch.stack([i[1] for i in items])),
                                                                       torch.stack([i[2] for i in items])))
    model = TimedLogs(encoder="small_cnn", encoder_kwargs={"width": 4}, num_masks=4, image_size=16, mask_width=8, warmup_epochs=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    per_step = TimedLogs.seconds / args.steps * 1e3
    values = TimedLogs.values / args.steps
    print(f"self.log in the step: {per_step:.2f} ms per step, {values:.0f} values per step, "
          f"{per_step / values:.2f} ms per value ({torch.__version__}, Lightning {pl.__version__})")


if __name__ == "__main__":
    main()
