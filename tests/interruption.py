"""A callback that stops a run after some epochs, as a pre-empted job would be (used by ``test_cli``)."""

import lightning as L


class StopAfterEpochs(L.Callback):
    """Ends training after ``epochs`` epochs, whatever ``max_epochs`` says (its schedule stays that of the full run)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True
