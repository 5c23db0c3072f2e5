"""A module's forward replaced for a block: the one place that knows how to put it back under offload hooks."""

import contextlib


@contextlib.contextmanager
def forward_replaced(module, forward):
    """`module.forward` is `forward` for the block, then what it was: the class's, or the wrapper an offload hook
    put on the module (accelerate's and diffusers' hooks are such wrappers; deleting ours would delete theirs)."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous
