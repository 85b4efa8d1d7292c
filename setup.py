from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "python_coreml_sd" / "_version.py").read_text(), version)

setup(
    name="python_coreml_sd",
    version=version["__version__"],
    description="Convert Stable Diffusion (PyTorch / diffusers) to Core ML and verify the result anywhere",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["python_coreml_sd", "python_coreml_sd.*"]),
    python_requires=">=3.10",
    install_requires=[
        # coremltools 9.0 fails on numpy 2.4 ("only 0-dimensional arrays can be converted").
        "numpy>=1.26,<2.4",
        "coremltools==9.0",
        "torch>=2.4",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors",
        "accelerate",  # low-memory weight loading for full-size models
        # --lora: diffusers loads and fuses LoRAs only through PEFT; transformers 5 needs peft's
        # transformers_weight_conversion (peft >= 0.18.1 or so; 0.21.2 is what the tests run with).
        "peft>=0.21",
        "scikit-learn",  # coremltools' k-means palettizer (the reference we compare with)
        "tqdm",
        "Pillow",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout"]},
    include_package_data=True,
)
