"""Measuring and looking at features: mIoU from a confusion matrix, and pictures of feature maps
(grids, activation heat maps, PCA colors, k-means maps)."""
