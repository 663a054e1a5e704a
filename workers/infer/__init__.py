"""Attention U-Net segmentation of the working grid: model, training, prediction."""
