"""cpnet: AlexNet from scratch on NumPy/CuPy arrays, every forward and backward pass by hand."""
import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "cpnet" / "__init__.py").read_text()).group(1)

setup(
    name="cpnet",
    version=version,
    description="AlexNet (Krizhevsky et al., 2012) built from scratch on NumPy/CuPy arrays",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # cli/ and data/ live at the top of the repo but install inside the cpnet namespace only.
    packages=["cpnet", "cpnet.ops", "cpnet.kernels", "cpnet.cli", "cpnet.data"],
    package_dir={"cpnet": "cpnet", "cpnet.cli": "cli", "cpnet.data": "data"},
    package_data={"cpnet.kernels": ["*.cu", "*.cuh", "*.h"]},
    install_requires=["numpy>=1.23", "h5py>=3.7", "pillow>=9.0", "click>=8.0", "threadpoolctl>=3.1"],
    extras_require={
        # Pick the CuPy wheel that matches your CUDA: cupy-cuda12x for CUDA 12, cupy-cuda13x for CUDA 13.
        "gpu": ["cupy-cuda12x"],
        "gpu13": ["cupy-cuda13x"],
        "test": ["pytest>=7"],
        # Data-parallel replicas (cpnet.dist): mpi4py, and the MPICH wheel that brings `mpiexec` into the venv
        # (on a cluster, build mpi4py against the site's MPI instead and leave out the mpich wheel).
        "dist": ["mpi4py>=4.0", "mpich"],
    },
    entry_points={"console_scripts": ["cpnet=cpnet.cli.main:cli"]},
)
