"""--cpu-offload: sequential offload; every submodule's weights move to the GPU only for its own forward."""

from sdrun.backends.base import Backend


def apply(pipe, device):
    pipe.enable_sequential_cpu_offload(device=device)


BACKEND = Backend(
    name="cpu_offload",
    help="Keep weights in CPU memory, moving each layer to the GPU as it runs: the least GPU memory "
    "(under 1 GB for SD 1.5), but several times slower.",
    apply=apply,
    needs_cuda=True,
    conflicts=("model_offload",),
    places_pipeline=True,
)
