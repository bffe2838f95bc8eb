"""Training data with a resumable position: NeMo's DataModule + SALMDataset over the manifests, whose training
loader can start at a saved (epoch, batches drawn).

Each epoch of NeMo's training stream is a seeded shuffle, so resuming at epoch E, batch N sets the lhotse sampler to
epoch E and fast-forwards it N batches (metadata only, no audio) as the training loader is built.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nemo.collections.speechlm2.data import DataModule, SALMDataset
from omegaconf import OmegaConf

from medasr import StageError
from medasr.params import TrainParams
from stages.train.config import data_config


def train_sampler(loader: Any) -> Any:
    """The lhotse sampler behind NeMo's training dataloader (it lives in the main process for audio manifests)."""
    loader = getattr(loader, "_source", loader)  # NeMo's BroadcastingDataLoader wraps a torch DataLoader
    sampler = getattr(loader, "sampler", None)
    if sampler is None or not hasattr(sampler, "load_state_dict"):
        raise StageError("cannot restore the data position: the training dataloader has no lhotse sampler")
    return sampler


def fast_forward(sampler: Any, batches: int) -> None:
    """Make the sampler's next batch the one an uninterrupted run would draw after `batches` batches of the
    sampler's current epoch.

    This replays the seeded shuffle over metadata only (no audio is read), as lhotse's own restore does. Its
    `state_dict()` refuses samplers with a custom constraint, which NeMo always sets, so the replay is done
    here. `_just_restored_state` is lhotse's documented restore flag: the next `iter()` continues from here.
    """
    sampler.allow_iter_to_reset_state()
    iter(sampler)  # restart this epoch's seeded shuffle from its beginning
    for _ in range(batches):
        next(sampler)
    sampler._just_restored_state = True


@contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGTERM/SIGINT held back in this thread while it forks data workers: a forked process inherits the mask, so
    a stop signal that reaches a worker before it ignores them (`_worker_init`) stays pending and is then dropped.
    Other threads of the training process still take the signal for its handler: nothing is lost."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _worker_init(inner: Any, worker_id: int) -> None:
    # torch's worker handler dies of a SIGTERM that does not come from its parent; the stage's stop signals are the
    # training process's to act on (checkpoint, then stop its workers itself)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if inner is not None:
        inner(worker_id)


def shielded(loader: Any) -> Any:
    """`loader` whose worker processes never die of the stop signals sent to the stage's process group: a worker
    that died would fail the step or the save. They stay in the group, so SIGKILL still ends them."""
    source = getattr(loader, "_source", loader)  # NeMo's BroadcastingDataLoader wraps a torch DataLoader
    workers = getattr(source, "num_workers", None)  # None: not a torch DataLoader
    if workers and "_get_iterator" not in vars(source):
        source.worker_init_fn = functools.partial(_worker_init, source.worker_init_fn)
        start = source._get_iterator  # what DataLoader.__iter__ calls: the iterator it makes forks the workers

        def start_shielded() -> Any:
            with stop_signals_blocked():
                return start()

        source._get_iterator = start_shielded
    return loader


class ResumableDataModule(DataModule):
    """NeMo's DataModule whose training loader starts at `position` (epoch, batches drawn), once; its loaders'
    workers leave stop signals to the training process."""

    position: tuple[int, int] | None = None

    def val_dataloader(self):
        loaders = super().val_dataloader()  # a CombinedLoader: one loader per validation set
        for loader in loaders.flattened:
            shielded(loader)
        return loaders

    def train_dataloader(self):
        loader = shielded(super().train_dataloader())
        if self.position is not None:
            epoch, batches = self.position
            sampler = train_sampler(loader)
            sampler.set_epoch(epoch)
            fast_forward(sampler, batches)
            self.position = None
        return loader


def make_datamodule(model: Any, manifest_dir: Path, train: TrainParams) -> ResumableDataModule:
    """NeMo's DataModule + SALMDataset over the manifests, able to start at a saved data position."""
    cfg = OmegaConf.create(data_config(manifest_dir, train))
    return ResumableDataModule(cfg, tokenizer=model.tokenizer, dataset=SALMDataset(model.tokenizer))
