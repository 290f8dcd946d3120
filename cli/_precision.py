"""--precision for `cpnet train` and `cpnet bench`, and --tf32, its older spelling."""

import click

from cpnet.precision import PRECISIONS


def precision_options(f):
    """Add --precision and the deprecated --tf32 to a command (its function takes `precision` and `tf32`)."""
    f = click.option("--tf32", is_flag=True, help="Deprecated: the same as --precision tf32.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                     help="fp32: float32 GEMMs as they are; tf32: GPU, let cuBLAS use TF32 tensor cores for the "
                          "float32 GEMMs (about 10 mantissa bits in the products; no effect on the host); bf16: "
                          "mixed precision, float32 weights and momentum, bf16 activations and GEMM inputs with "
                          "float32 accumulation (GPU: tensor cores, compute capability 8.0 or newer; host: the "
                          "same rounding emulated in NumPy, slower than fp32) [default: fp32].")(f)
    return f


def apply_precision(precision, tf32):
    """The precision the flags ask for, switched on; a usage error where --tf32 contradicts --precision."""
    if tf32 and precision not in (None, "tf32"):
        raise click.UsageError(f"--tf32 contradicts --precision {precision} (--tf32 is the older spelling of "
                               "--precision tf32)")
    chosen = "tf32" if tf32 else (precision or "fp32")
    if tf32:
        click.echo("note: --tf32 is deprecated; use --precision tf32", err=True)
    if chosen == "tf32":
        from cpnet import backend

        backend.enable_tf32()
    return chosen
