"""The tests' oracle: the float64 reference on the global batch, ``cusyncbn._reference`` (one
reference for the tests, the benchmark and the launch-configuration sweep; it imports nothing
of cusyncbn's own code). The tests import it as ``reference``."""
from cusyncbn._reference import CHANNEL_LAST, backward, eval_backward, eval_forward, forward, fused_backward, \
    fused_eval_backward, fused_eval_forward, fused_forward, update_running

__all__ = ["CHANNEL_LAST", "backward", "eval_backward", "eval_forward", "forward", "fused_backward",
           "fused_eval_backward", "fused_eval_forward", "fused_forward", "update_running"]
