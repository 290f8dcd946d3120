"""cpnet: AlexNet from scratch on NumPy/CuPy arrays, every forward and backward pass by hand."""

__version__ = "0.1.0"
