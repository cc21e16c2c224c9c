"""What every pretraining method shares: the optimizer of the paper and the logging of loss parts."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from timm.optim import create_optimizer_v2

from dreamteacher.config import Config
from dreamteacher.train.engine import fused_adam, warmup_cosine


class PretrainMethod(L.LightningModule):
    """Subclasses define `compute_losses(batch) -> {"loss": total, **parts}`.

    `total_steps` / `warmup_steps` are set by the caller before `fit` (they depend on data size).
    """

    def __init__(self, config: Config, method: str, extra: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.total_steps = 1
        self.warmup_steps = 0
        # saved inside every checkpoint, so that export/info/resume never have to guess
        self.save_hyperparameters({"method": method, "config": config.to_dict(), **(extra or {})})

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "noise_seed" in batch:  # read on the host, see engine.seeded_noise
            return {**super().transfer_batch_to_device({k: v for k, v in batch.items() if k != "noise_seed"},
                                                       device, dataloader_idx), "noise_seed": batch["noise_seed"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.compute_losses(batch)
        for name, value in losses.items():  # averaged over processes: the loss of the global batch
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return losses["loss"]

    def trainable_module(self) -> torch.nn.Module:
        return self

    def configure_optimizers(self):
        opt = self.config.optim
        lr = opt.base_lr * opt.batch_size / 256  # linear scaling rule
        # timm's factory: no weight decay on biases and norm weights (nor LARS adaptation, MoCo v3's rule)
        adam_family = any(name in opt.name.lower() for name in ("adam", "lamb"))
        kwargs = {"betas": tuple(opt.betas)} if adam_family else {"momentum": opt.momentum}
        if opt.name.lower() in ("adam", "adamw"):  # torch's own classes, which have a fused kernel
            kwargs.update(fused_adam(self.trainable_module()))
        optimizer = create_optimizer_v2(self.trainable_module(), opt=opt.name, lr=lr,
                                        weight_decay=opt.weight_decay, **kwargs)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.total_steps, self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
