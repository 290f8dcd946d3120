"""Datasets (installed as cpnet.data): HDF5 prep from image sources, and the batch loader with augmentation."""
