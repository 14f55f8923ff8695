"""The Lightning SWA configuration of ``lightning-swa-explained`` with weightavg, and its LR curve.

Same arguments as ``lightning.pytorch.callbacks.StochasticWeightAveraging``: model lr 0.1,
``swa_lrs=0.001``, ``swa_epoch_start=2``, ``annealing_epochs=10``, ``annealing_strategy='cos'``,
20 epochs. SWA starts at the 2nd epoch; from there the rate goes from 0.1 to 0.001 over 10 epochs
along a cosine (reached at the 12th epoch) and stays at 0.001: the curve that text describes.
(Lightning 2.6's own callback, run the same way, gives 0.1, 0.1, 0.0505, then 0.001 throughout.)

Run: ``python examples/lightning_swa.py [--plot lr.png]``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn as nn

from weightavg.lightning import StochasticWeightAveraging


def plot_swa_lr_curve(model_lr: float, swa_lr: float, swa_epoch_start: int = 2, annealing_epochs: int = 10,
                      annealing_strategy: str = "cos", max_epochs: int = 20, batches: int = 10) -> list[float]:
    lrs: list[float] = []

    class SimpleModel(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self.linear(torch.rand(4, 1)), torch.rand(4, 1))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=model_lr)

    class RecordLR(pl.Callback):  # the seed subclassed the callback to read a private scheduler
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(
        callbacks=[StochasticWeightAveraging(swa_lrs=swa_lr, swa_epoch_start=swa_epoch_start,
                                             annealing_epochs=annealing_epochs,
                                             annealing_strategy=annealing_strategy), RecordLR()],
        max_epochs=max_epochs, num_sanity_val_steps=0, enable_progress_bar=False, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(SimpleModel(), train_dataloaders=range(batches))
    print("lrs:", [round(x, 5) for x in lrs])
    return lrs


def main(plot: str | None = None, batches: int = 10) -> list[float]:
    lrs = plot_swa_lr_curve(0.1, 0.001, batches=batches)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.plot(range(1, len(lrs) + 1), lrs, marker="o")
        plt.xlabel("epoch")
        plt.ylabel("learning rate")
        plt.title("swa_lrs=0.001, swa_epoch_start=2, annealing_epochs=10, cos")
        plt.savefig(plot)
        plt.close()
        print(f"wrote {plot}")
    return lrs


if __name__ == "__main__":
    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plot", help="save the curve to this image file")
    main(p.parse_args().plot)
