"""The training batches of this rank, epoch by epoch: `batches.epoch(e, start)` yields the micro-batches of
epoch `e` from batch `start` on (a resume inside an epoch), each a dict like `collate_depth`'s output on the
training device. Two sources behind that one interface: Accelerate-prepared DataLoader workers (PNG folders,
data that does not fit on the GPU), or the whole dataset on the device (no workers)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from protodepth.data import collate_depth
from protodepth.data.loaders import DeviceBatches, EpochShuffleSampler, choose_data_device


class LoaderBatches:
    """DataLoader workers -> Accelerate's sharded, device-placed loader."""

    def __init__(self, loader, dataset):
        self.loader, self.dataset = loader, dataset

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start: int = 0):
        self.loader.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        if not start:
            return iter(self.loader)
        from accelerate import skip_first_batches

        return iter(skip_first_batches(self.loader, start))


class FixedEpoch:
    """Validation batches on the device: every iteration is epoch 0 (a fixed draw), in order."""

    def __init__(self, batches: DeviceBatches):
        self.batches = batches

    def __iter__(self):
        return self.batches.epoch(0)


def data_loader(dataset, cfg, workers: int, shuffle: bool, train: bool) -> DataLoader:
    t = cfg.train
    sampler = EpochShuffleSampler(len(dataset), t.seed, shuffle=shuffle)
    # Persistent training workers: restarting 12 of them every epoch cost ~0.5 s each time (a third of an H100
    # run with 14-step epochs). They see set_epoch through the dataset's shared-memory epoch.
    return DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, collate_fn=collate_depth,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=train,
                      persistent_workers=train and workers > 0)


def training_batches(cfg, accelerator, train_ds, val_ds, workers: int):
    """(train batches, validation batches or None, data note, loaders to prepare): the device path when
    `choose_data_device` picks it, else DataLoaders that Accelerate prepares (shards and places)."""
    t = cfg.train
    where = choose_data_device(cfg.data, train_ds, accelerator.device)
    # every rank must take the same path (their accumulation windows and collectives follow it); free memory is
    # per GPU, so "auto" may differ between ranks: the device path only if every rank chose it
    on_device = torch.tensor(float(where == "cuda"), device=accelerator.device)
    if accelerator.num_processes > 1 and float(accelerator.gather(on_device.reshape(1)).min()) < 1:
        where = type(where)("cpu", "data.device=auto: another rank's GPU has too little free memory, batches come "
                                   "from DataLoader workers on every rank")
    want_val = bool(len(val_ds) and t.val_every)
    if where == "cuda":
        rank, world, dev = accelerator.process_index, accelerator.num_processes, accelerator.device
        train = DeviceBatches(train_ds, t.batch_size, t.seed, rank, world, dev)
        val = DeviceBatches(val_ds, t.batch_size, t.seed, rank, world, dev, drop_last=False, shuffle=False) \
            if want_val else None
        return train, (FixedEpoch(val) if val else None), where.reason, []
    train_dl = data_loader(train_ds, cfg, workers, shuffle=True, train=True)
    val_dl = data_loader(val_ds, cfg, workers, shuffle=False, train=False) if want_val else None
    return train_dl, val_dl, f"{where.reason} ({workers} per process)", [d for d in (train_dl, val_dl) if d]
