from dreamteacher.losses.contrastive import image_infonce, moco_infonce, pixel_infonce
from dreamteacher.losses.denoising import corrupt, denoising_loss
from dreamteacher.losses.feature import attention_transfer_loss, whiten, whitened_mse_loss
from dreamteacher.losses.segmentation import dice_loss, interpreter_loss, soft_label_loss

__all__ = ["attention_transfer_loss", "corrupt", "denoising_loss", "dice_loss", "interpreter_loss",
           "image_infonce", "moco_infonce", "pixel_infonce", "soft_label_loss", "whiten", "whitened_mse_loss"]
