"""--cpu-offload: sequential offload; every submodule's weights move to the GPU only for its own forward."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    pipe.enable_sequential_cpu_offload(device=device)


BACKEND = Backend(
    name="cpu_offload",
    brief="saves the most (SD 1.5 at 512x512 in 0.63 GiB); costs about 14x the time",
    help="Keep weights in CPU memory, moving each layer to the GPU as it runs: the least GPU memory "
    "(SD 1.5 at 512x512: 0.63 GiB), but about 14x slower.",
    apply=apply,
    lowers=("weights",),
    needs_cuda=True,
    conflicts=("model_offload",),
    places_pipeline=True,
)
