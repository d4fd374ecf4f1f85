"""The CUTLASS 2:4 sparse GEMMs of the extension ``_C``: the low-level API under ``SparseLinear``.

For benchmarks, tools and users who hold compressed operands themselves:

* :mod:`.loader`: loading ``_C`` and what it was built for (``extension``,
  ``extension_error``, ``built_archs``, ``runs_on``, ``sm90_built``);
* :mod:`.policy`: which kernel and configuration run where (``select_kernel``,
  ``sm80_config_for``, ``sm90_config_for``, ``SM90_CONFIGS``, ``SM90_TILES``);
* :mod:`.launch`: raw launches on operands already shaped for a kernel
  (``launch_sm80``, ``launch_sm90``);
* :mod:`.op`: ``y = x @ W.T + b`` from any input (``pad_input``, ``sm80_tokens``,
  ``sm80_linear``, ``sm90_linear``, ``kernel_linear`` to pick one), the
  ``torch.library`` op ``sparse24_linear`` and its operand checks (``check_operands``).

Importing this package does not load ``_C`` and touches no GPU.
"""

# Each submodule's __all__ is this package's API: one list to keep, in the module it describes.
from . import launch, loader, op, policy
from .launch import *  # noqa: F403
from .loader import *  # noqa: F403
from .op import *  # noqa: F403
from .policy import *  # noqa: F403

__all__ = [*loader.__all__, *policy.__all__, *launch.__all__, *op.__all__]
