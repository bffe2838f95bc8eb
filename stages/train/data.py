"""Training data with a resumable position: NeMo's DataModule + SALMDataset over the manifests, whose training
loader can start at a saved (epoch, batches drawn).

Each epoch of NeMo's training stream is a seeded shuffle, so resuming at epoch E, batch N sets the lhotse sampler to
epoch E and fast-forwards it N batches (metadata only, no audio) as the training loader is built.
"""

from __future__ import annotations

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


class ResumableDataModule(DataModule):
    """NeMo's DataModule whose training loader starts at `position` (epoch, batches drawn), once."""

    position: tuple[int, int] | None = None

    def train_dataloader(self):
        loader = super().train_dataloader()
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
