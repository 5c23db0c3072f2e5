"""The command line: `sdrun PROMPT` (the default command, `run`), `sdrun info`, `sdrun replay`, `sdrun decode`.

This layer only turns options into a RunConfig and Jobs, and errors into one line and an exit code:

    0    every image was written (or skipped with --skip-existing)
    1    the run could not start: the model cannot be loaded, the kernel cannot be built, the output is not writable;
         or the disk filled up during a batch (it stopped there)
    2    usage error: a bad option value or combination, a bad prompt file; nothing was loaded or written
    3    some items failed (bad prompt-file lines, NaN output, ...); the others were written
    4    out of GPU memory (some items, or the run); the message names flags that lower memory
    130  interrupted (Ctrl-C or SIGTERM); finished images are complete, the one in progress is absent
"""

import dataclasses
import os
import sys
from pathlib import Path

import click
import torch

from sdrun import __version__, backends
from sdrun.batch import plan_items, read_prompt_file, run_items
from sdrun.config import DEFAULT_MODEL, DEFAULT_OUTPUT, Job, RunConfig, validate
from sdrun.console import Reporter, stderr
from sdrun.errors import EXIT_INTERRUPTED, OutOfMemory, SdrunError, UsageError
from sdrun.output import read_metadata


class SdrunGroup(click.Group):
    """A group whose first argument, when it is not a command name, is a prompt for `run`, and which turns
    every error into one line on stderr and the exit codes above (a traceback only with SDRUN_DEBUG=1)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, **_ignored):
        debug = os.environ.get("SDRUN_DEBUG") == "1"
        try:
            return super().main(args, prog_name or "sdrun", standalone_mode=False)
        except (click.exceptions.Abort, KeyboardInterrupt):
            stderr.print("sdrun: interrupted", style="red")
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as error:
            if debug:
                raise
            _error_line(f"{error.format_message()} (see sdrun --help)")
            sys.exit(error.exit_code)
        except SdrunError as error:
            if debug:
                raise
            _error_line(str(error))
            sys.exit(error.exit_code)
        except torch.OutOfMemoryError:
            if debug:
                raise
            _error_line("out of GPU memory: add --vae-tiling, --model-offload or --cpu-offload, or use a smaller size")
            sys.exit(OutOfMemory.exit_code)


def _error_line(message: str) -> None:
    stderr.print(f"sdrun: error: {message}", style="red", markup=False, soft_wrap=True)


@click.group(cls=SdrunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdrun")
def cli():
    """Stable Diffusion text-to-image, made for small GPUs and big batches.

    \b
    Examples:
      sdrun "astronaut on mars" --xformers --fp16
      sdrun "a red fox in snow" -n 4 --seed 42 -o foxes/
      sdrun --prompt-file prompts.jsonl --skip-existing --json > log.jsonl
      sdrun "city at night" -W 3840 -H 2160 --fp16 --xformers --vae-tiling
      sdrun "test" --model tiny          # built-in random-weight model: noise, offline, seconds on a CPU
      sdrun info                         # versions, GPU, which flags work here
      sdrun replay outputs/42-a-red-fox-in-snow.png --set steps=50

    \b
    Environment:
      SDRUN_MODEL           default for --model
      SDRUN_DEBUG=1         full tracebacks; verbose kernel build
      SDRUN_CACHE           where the compiled attention kernel is cached (~/.cache/sdrun)
      SDRUN_SKIP_CUDA_BUILD=1, SDRUN_CUDA_ARCHS, NVCC_THREADS   ahead-of-time kernel build (setup.py)

    Exit codes: 0 done, 1 could not start (or the disk filled up), 2 usage, 3 some items failed, 4 out of GPU
    memory, 130 interrupted.
    """


def memory_options(fn):
    """One flag per backend, generated from the registry so help text and backends never drift."""
    for backend in reversed(backends.BACKENDS):
        names = [backend.flag]
        if backend.name == "xformers":
            names.append("--mem-efficient-attention")
        fn = click.option(*names, backend.name, is_flag=True, help=backend.help)(fn)
    return fn


def common_options(fn):
    for option in reversed([
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="Where to run; auto picks the GPU when torch sees one."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr; errors still show."),
        click.option("--overwrite", is_flag=True, help="Replace existing files (never done otherwise)."),
    ]):
        fn = option(fn)
    return memory_options(fn)


def _flags(options: dict) -> tuple[str, ...]:
    return tuple(backend.name for backend in backends.BACKENDS if options.pop(backend.name, False))


@cli.command()
@click.argument("prompt", required=False)
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, envvar="SDRUN_MODEL", show_envvar=True,
              help="A Hub id, a diffusers folder, a .safetensors/.ckpt file, or 'tiny' (built in; its images are noise).")
@click.option("--config", "config_dir", type=click.Path(), help="Diffusers config folder for a single-file checkpoint "
              "(overrides the family detected from its keys).")
@click.option("--prompt-file", help="Prompts to make: .txt (one per line) or .jsonl (objects with per-item "
              "overrides); - reads stdin.")
@click.option("--negative-prompt", default="", help="What to steer away from.")
@click.option("-W", "--width", type=int, help="Image width, a multiple of 8  [default: the model's, e.g. 512].")
@click.option("-H", "--height", type=int, help="Image height, a multiple of 8  [default: the model's].")
@click.option("--steps", type=int, default=30, show_default=True, help="Denoising steps.")
@click.option("--guidance", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--scheduler", help="Sampler: ddim, pndm, euler, euler-a, dpm++2m, dpm++2m-karras, unipc, lms "
              "[default: the model's own].")
@click.option("--seed", type=int, help="Seed of the first image; image k gets seed+k. Random (and recorded) if omitted.")
@click.option("-n", "--num-images", type=int, default=1, show_default=True, help="Images per prompt.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images per denoiser pass (more memory).")
@click.option("-o", "--output", default=DEFAULT_OUTPUT, show_default=True,
              help="A .png file, a folder (ending in /), or a template with {seed} {index} {prompt}.")
@click.option("--skip-existing", is_flag=True, help="Skip images already made with the same settings: rerun a batch "
              "to finish it. Any other file at a planned name stops the run (unless --overwrite).")
@click.option("--allow-outside-output", is_flag=True, help="Let a prompt file's per-line output leave the -o folder.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed item instead of going on.")
@click.option("--json", "json_lines", is_flag=True, help="One JSON object per image (done, skipped, failed) on stdout.")
@common_options
def run(prompt, prompt_file, model, config_dir, output, batch_size, device, quiet, overwrite, skip_existing,
        allow_outside_output, fail_fast, json_lines, **options):
    """Make images from PROMPT (or from --prompt-file). This is the default command."""
    flags = _flags(options)
    job = Job(prompt=prompt or "", **options)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing contradict each other: choose one")
    if prompt_file and prompt:
        raise UsageError("give either a PROMPT or --prompt-file, not both")
    run_config = RunConfig(model=model, config_dir=config_dir, device=device, flags=flags, output=output,
                           batch_size=batch_size, overwrite=overwrite, skip_existing=skip_existing,
                           fail_fast=fail_fast, quiet=quiet, json_lines=json_lines,
                           allow_outside_output=allow_outside_output)
    if prompt_file:
        validate(dataclasses.replace(job, prompt="x"))
        jobs, bad_lines = read_prompt_file(prompt_file, job)
        if bad_lines and fail_fast:
            first = bad_lines[0]
            raise UsageError(f"{prompt_file} line {first.line}: {first.message}")
    else:
        validate(job)
        jobs, bad_lines = [(None, job)], []
    _generate(run_config, jobs, bad_lines)


def _generate(run_config: RunConfig, jobs, bad_lines) -> None:
    from sdrun import pipeline

    planned = pipeline.plan(run_config)  # model source, device and flags are checked before anything is written
    items = plan_items(jobs, run_config)
    summary = run_items(run_config, items, bad_lines, Reporter(run_config.quiet, run_config.json_lines), planned)
    if summary.exit_code:
        sys.exit(summary.exit_code)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--set", "changes", multiple=True, metavar="KEY=VALUE",
              help="Change one setting (prompt, negative_prompt, seed, steps, guidance, width, height, scheduler, model).")
@click.option("-o", "--output", help="Where to write  [default: IMAGE-replay.png beside IMAGE].")
@common_options
def replay(image, changes, output, device, quiet, overwrite, **options):
    """Make IMAGE again from its sdrun metadata: same model, seed, settings and flags."""
    meta = read_metadata(Path(image))
    settings = {key: meta[key] for key in ("prompt", "negative_prompt", "seed", "steps", "guidance", "width",
                                           "height", "scheduler", "model")}
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or key not in settings:
            raise UsageError(f"--set {change!r}: use KEY=VALUE with KEY one of {', '.join(settings)}")
        settings[key] = _convert(key, value, settings[key])
    model = settings.pop("model")
    flags = tuple(dict.fromkeys(meta["flags"] + list(_flags(options))))
    job = Job(num_images=1, **settings)
    validate(job)
    target = output or str(Path(image).with_name(Path(image).stem + "-replay.png"))
    run_config = RunConfig(model=model, config_dir=meta.get("config_dir"), device=device, flags=flags,
                           output=target, batch_size=meta.get("batch_size", 1), overwrite=overwrite, quiet=quiet,
                           extra={"replayed_from": str(image)})
    _generate(run_config, [(None, job)], [])


def _convert(key: str, value: str, current):
    try:
        return type(current)(value) if current is not None else (int(value) if key in ("width", "height") else value)
    except ValueError:
        raise UsageError(f"--set {key}={value!r}: {key} must be a {type(current).__name__}")


@cli.command()
@click.argument("latents", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", help="Where to write  [default: the image name the latents were saved for].")
@common_options
def decode(latents, output, device, quiet, overwrite, **options):
    """Decode a LATENTS file (.latents.safetensors) that a run saved when it ran out of memory while decoding."""
    from sdrun.decode import decode_file

    decode_file(latents, output, device=device, quiet=quiet, overwrite=overwrite, flags=_flags(options))


@cli.command()
@click.option("--selftest/--no-selftest", default=True, show_default=True,
              help="Check the bundled kernel against PyTorch attention on this GPU.")
def info(selftest):
    """Versions, the GPU and its capability, the kernel build, and which flags can be used here."""
    from sdrun.info import report

    report(selftest)
