from dreamteacher.losses.feature import attention_transfer_loss, whiten, whitened_mse_loss

__all__ = ["attention_transfer_loss", "whiten", "whitened_mse_loss"]
