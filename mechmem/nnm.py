"""``mechmem.nnm``: Neural Native Memory, an alias of :mod:`mechmem.methods.nnm`.

Example:
    >>> from mechmem import nnm
    >>> "Whitening" in nnm.__all__
    True
"""

from mechmem.methods.nnm import *  # noqa: F403
from mechmem.methods.nnm import __all__  # noqa: F401
