"""fastconv's custom ops (torch.ops.fastconv.*): importing this package registers them."""
from . import conv2d  # noqa: F401
from . import conv2d_prologue  # noqa: F401
from . import conv_bn_act  # noqa: F401
from . import max_pool2d  # noqa: F401
from . import conv_bn_chain  # noqa: F401
from . import residual_block  # noqa: F401
