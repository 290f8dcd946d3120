"""Datasets (installed as cpnet.data): HDF5 prep from image sources, and the batch loader with augmentation.

    from cpnet.data import H5Dataset, TrainLoader, EvalLoader, FORMAT_VERSION
"""
from .h5format import FORMAT_VERSION, H5Dataset
from .loader import EvalLoader, TrainLoader

__all__ = ["FORMAT_VERSION", "H5Dataset", "TrainLoader", "EvalLoader"]
