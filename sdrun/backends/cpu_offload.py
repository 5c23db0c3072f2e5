"""--cpu-offload: every model's weights stay in pinned CPU memory and stream to the GPU layer by layer, the next
layer's copy overlapping the current layer's compute (sdrun/offload.py)."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    from sdrun.offload import stream_pipeline

    return stream_pipeline(pipe, device)


BACKEND = Backend(
    name="cpu_offload",
    brief="saves the most: weights stream from CPU memory layer by layer; costs time (figures in docs/benchmarks.md)",
    help="Keep weights in pinned CPU memory and stream each layer to the GPU as it runs, the next layer's copy "
    "overlapping the current one's compute: the least GPU memory (one layer's weights plus activations), at the "
    "cost of copying the UNet over PCIe every step (figures in docs/benchmarks.md).",
    apply=apply,
    lowers=("weights",),
    needs_cuda=True,
    conflicts=("model_offload",),
    places_pipeline=True,
)
