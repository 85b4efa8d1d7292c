import platform

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    on_macos = platform.system() == "Darwin"
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; none is visible to PyTorch"))
        if "macos" in item.keywords and not on_macos:
            item.add_marker(pytest.mark.skip(reason="needs macOS: Core ML prediction and compilation exist only there"))
