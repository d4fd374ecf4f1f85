"""Test configuration.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set
here, at the very top, before anything imports wanda_kernels.kernels. It defaults to
"1" only on machines with no NVIDIA device node: a GPU machine runs compiled Triton.
Checking for /dev/nvidiactl touches no GPU (no CUDA init at collection).
"""

import os

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from wanda_kernels._env import env_flag  # noqa: E402  (imports no Triton and touches no GPU)

INTERPRETING = env_flag("TRITON_INTERPRET")
HAS_TRITON = importlib.util.find_spec("triton") is not None
# In CI (CI=true) a missing Triton fails the Triton tests instead of skipping them, so
# a broken install step cannot turn the kernel tests into silent skips.
STRICT = env_flag("CI")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_runtest_setup(item):
    # Evaluated when a test is about to run, never at collection.
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture
def triton_device():
    """Device for Triton tests: CPU tensors under the interpreter, else CUDA; skip otherwise."""
    if not HAS_TRITON:
        (pytest.fail if STRICT else pytest.skip)("Triton is not installed")
    if INTERPRETING:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("Triton tests need TRITON_INTERPRET=1 or a CUDA device")


@pytest.fixture
def device():
    """Device for torch-path tests: CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
