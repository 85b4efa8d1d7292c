"""Agreement metrics, defined exactly as Apple's converter reports them so figures compare."""
import numpy as np


def psnr(reference, output) -> float:
    """PSNR in dB: 20 * log10(max|ref| / sqrt(mean((out - ref) ** 2))), reference = PyTorch fp32.

    Identical arrays give +inf.
    """
    ref = np.asarray(reference, dtype=np.float64)
    out = np.asarray(output, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"PSNR needs equal shapes, got reference {ref.shape} and output {out.shape}")
    rmse = np.sqrt(np.mean((out - ref) ** 2))
    peak = np.abs(ref).max()
    if rmse == 0:
        return float("inf")
    return float(20 * np.log10(peak / rmse))

