"""Build script. The package is pure Python (Triton kernels are compiled at run time).

The compiled 2:4 sparse GEMM extension (csrc/, built through CMakeLists.txt) is
added to this build by the 2:4 inference work; until then `pip install .` needs no
compiler at all.
"""

from setuptools import setup

setup()
