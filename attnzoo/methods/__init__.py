"""Built-in attention methods: importing this package registers them all."""

from . import softmax  # noqa: F401  (first: other methods build on it)
from . import clipped_softmax, selective, sigmoid  # noqa: F401
from . import linear  # noqa: F401
from . import lightning  # noqa: F401
from . import hedgehog  # noqa: F401
from . import aaren  # noqa: F401
from . import inline  # noqa: F401
from . import softmax_free  # noqa: F401
from . import flow  # noqa: F401
from . import agent  # noqa: F401
from . import sliding_window  # noqa: F401
from . import block_sparse  # noqa: F401
from . import neighborhood  # noqa: F401
from . import dilated  # noqa: F401
from . import moa  # noqa: F401
from . import combiner  # noqa: F401
from . import landmark  # noqa: F401
from . import hip  # noqa: F401
from . import routing  # noqa: F401
from . import bilevel_routing  # noqa: F401
from . import seer  # noqa: F401
from . import recycled  # noqa: F401
