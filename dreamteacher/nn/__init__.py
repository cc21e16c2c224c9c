"""Networks: the timm student backbone, the feature regressor, segmentation heads and segmenters, the
feature interpreter, and the weight files that initialize them."""
