"""The command line: `sdrun PROMPT` (the default command, `run`), `sdrun plan`, `info`, `replay`, `decode`.

This layer only turns options into a RunConfig and Jobs, and errors into one line and an exit code:

    0    every image was written (or skipped with --skip-existing)
    1    the run could not start: the model cannot be loaded, the kernel cannot be built, the output is not writable;
         or the disk filled up during a batch (it stopped there)
    2    usage error: a bad option value or combination, a bad prompt file; nothing was loaded or written
    3    some items failed (bad prompt-file lines, NaN output, a process of --gpus that died, ...); the others
         were written
    4    out of GPU memory (some items, or the run); the message names flags that lower memory
    130  interrupted (Ctrl-C or SIGTERM); finished images are complete, the one in progress is absent

It imports no torch, diffusers or transformers: `--help`, `--version` and usage errors answer at once; the
commands import what they need when they run.
"""

import dataclasses
import os
import sys
from pathlib import Path

import click

from sdrun import __version__, adapters, backends
from sdrun.config import BY_NAME, DEFAULT_MODEL, DEFAULT_OUTPUT, FIELDS, REPLAY_KEYS, Job, RunConfig, validate
from sdrun.errors import EXIT_INTERRUPTED, OutOfMemory, SdrunError, UsageError

OOM_ADVICE = "out of GPU memory: add --max-vram GB (sdrun picks the settings), --vae-tiling or --model-offload, " \
             "or use a smaller size"


class SdrunGroup(click.Group):
    """A group whose first argument, when it is not a command name, is a prompt for `run`, and which turns
    every error into one line on stderr and the exit codes above (a traceback only with SDRUN_DEBUG=1)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["run", *args]
        ctx.meta["sdrun.args"] = list(args)  # as given, for the processes `--gpus` starts
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, **_ignored):
        debug = os.environ.get("SDRUN_DEBUG") == "1"
        try:
            return super().main(args, prog_name or "sdrun", standalone_mode=False)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _stderr().print("sdrun: interrupted", style="red")
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as error:
            if debug:
                raise
            _error_line(_usage_message(error))
            sys.exit(error.exit_code)
        except SdrunError as error:
            if debug:
                raise
            _error_line(str(error))
            sys.exit(error.exit_code)
        except Exception as error:
            torch = sys.modules.get("torch")
            if debug or torch is None or not isinstance(error, torch.OutOfMemoryError):
                raise
            _error_line(OOM_ADVICE)
            sys.exit(OutOfMemory.exit_code)


def _usage_message(error: click.ClickException) -> str:
    """click's refusal as one line. A prompt that is a command's name (`sdrun info --model tiny`) runs that
    command, which then refuses what follows: then say how to make an image of that prompt."""
    message = error.format_message()
    ctx = getattr(error, "ctx", None)
    command = ctx.command.name if ctx is not None and ctx.parent is not None else None
    if command in (None, "run", "plan"):  # plan takes run's options and arguments: nothing to refuse there
        return f"{message} (see sdrun --help)"
    run_options = {name for param in run.params for name in param.opts}
    if isinstance(error, click.NoSuchOption) and error.option_name in run_options:
        message, follows = f"sdrun {command} has no option {error.option_name}", f" {error.option_name} ..."
    elif command == "info":  # it takes no arguments: any is the rest of a prompt
        follows = " ..."
    else:
        return f"{message} (see sdrun {command} --help)"
    return (f'{message}: "{command}" is a command here, not a prompt; to make an image of the prompt '
            f'"{command}", write sdrun run "{command}"{follows}')


def _stderr():
    from sdrun.console import stderr

    return stderr


def _error_line(message: str) -> None:
    _stderr().print(f"sdrun: error: {message}", style="red", markup=False, soft_wrap=True)


def _memory_flags_help() -> str:
    lines = [(backend.flag, backend.brief) for backend in backends.BACKENDS]
    lines.append(("--max-vram GB", "sdrun adds the flags that fit GB of GPU memory, and says which"))
    width = max(len(flag) for flag, _ in lines) + 2
    return "\n".join(f"  {flag:<{width}}{brief}" for flag, brief in lines)


@click.group(cls=SdrunGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nMemory and speed flags (sdrun run --help says more, with their options):\n"
                    + _memory_flags_help())
@click.version_option(__version__, prog_name="sdrun")
def cli():
    """Stable Diffusion text-to-image, made for small GPUs and big batches.

    \b
    Examples:
      sdrun "astronaut on mars" --xformers --fp16
      sdrun "a red fox in snow" -n 4 --seed 42 -o foxes/
      sdrun --prompt-file prompts.jsonl --skip-existing --json > log.jsonl
      sdrun --prompt-file prompts.txt --seed 1 --gpus all   # one process per GPU, same files as one GPU
      sdrun "mountain lake at dawn" --hires 3840x2160 --fp16 --xformers   # a coherent 4K image
      sdrun "city at night" -W 3840 -H 2160 --fp16 --max-vram 4           # fits a 4 GB card
      sdrun plan "city at night" -W 3840 -H 2160 --max-vram 4             # what it would do, no weights loaded
      sdrun "test" --model tiny          # built-in random-weight model: noise, offline, seconds on a CPU
      sdrun info                         # versions, GPU, which flags work here
      sdrun replay outputs/42-a-red-fox-in-snow.png --set steps=50

    \b
    Environment:
      SDRUN_MODEL           default for --model
      SDRUN_DEBUG=1         full tracebacks; verbose kernel build
      SDRUN_CACHE           where the compiled attention kernel, file hashes and (for read-only installs)
                            Python bytecode are cached (~/.cache/sdrun)
      SDRUN_SKIP_CUDA_BUILD=1, SDRUN_CUDA_ARCHS, NVCC_THREADS   ahead-of-time kernel build (setup.py)

    Exit codes: 0 done, 1 could not start (or the disk filled up), 2 usage, 3 some items failed, 4 out of GPU
    memory, 130 interrupted.
    """


class FieldValue(click.ParamType):
    """A job field on the command line, parsed and checked by the field itself (config.FIELDS)."""

    def __init__(self, field):
        self.field = field
        self.name = {"int": "INTEGER", "float": "FLOAT", "size": "WxH", "path": "FILE"}.get(field.kind, "TEXT")

    def convert(self, value, param, ctx):
        """The field's own one-line UsageError, not click's "Invalid value for ..." around it."""
        return self.field.parse_text(value) if isinstance(value, str) else value


def job_options(fn):
    """One option per job field (config.FIELDS), so the command line, prompt files and replay never drift."""
    for field in reversed([f for f in FIELDS if f.options]):
        fn = click.option(*field.options, field.name, type=FieldValue(field), default=field.default,
                          show_default=field.default is not None and field.kind != "text", help=field.help)(fn)
    return fn


def memory_options(fn):
    """One flag per backend, and each backend's own options, generated from the registry."""
    for backend in reversed(backends.BACKENDS):
        for option in reversed(backend.options):
            fn = click.option(option.flag, option.name, type=click.IntRange(min=option.minimum),
                              help=option.help)(fn)
        names = [backend.flag] + (["--mem-efficient-attention"] if backend.name == "xformers" else [])
        fn = click.option(*names, backend.name, is_flag=True, help=backend.help)(fn)
    fn = click.option("--max-vram", type=click.FloatRange(min=0, min_open=True), metavar="GB",
                      help="Stay under this much GPU memory (the allocator's limit): sdrun picks the settings that "
                      "fit and says which on stderr; a budget no setting reaches is refused before loading.")(fn)
    fn = click.option("--cuda-graphs/--no-cuda-graphs", default=True, show_default=True,
                      help="Replay the denoising loop from a CUDA graph from the second image of a size on: no "
                      "launch overhead (up to 1536x1024, not with --cpu-offload, partial residency or "
                      "--model-offload under --max-vram; stderr says when not).")(fn)
    return fn


def common_options(fn):
    for option in reversed([
        click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                     help="Where to run; auto picks the GPU when torch sees one."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr; errors still show."),
        click.option("--overwrite", is_flag=True, help="Replace existing files (never done otherwise)."),
        click.option("--vae", type=click.Path(), help="A separate VAE in place of the model's: a .safetensors/.ckpt "
                     "file or a diffusers VAE folder (e.g. SDXL's fp16-fix VAE, which decodes in fp16)."),
    ]):
        fn = option(fn)
    return memory_options(fn)


def run_options(fn):
    for option in reversed([
        click.argument("prompt", required=False),
        click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, envvar="SDRUN_MODEL",
                     show_envvar=True, help="A Hub id, a diffusers folder, a .safetensors/.ckpt file, or 'tiny' "
                     "(built in; its images are noise)."),
        click.option("--config", "config_dir", type=click.Path(), help="Diffusers config folder for a single-file "
                     "checkpoint (overrides the family detected from its keys)."),
        click.option("--prompt-file", help="Prompts to make: .txt (one per line) or .jsonl (objects with per-item "
                     "overrides); - reads stdin."),
        click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Images per denoiser pass (more memory)."),
        click.option("-o", "--output", default=DEFAULT_OUTPUT, show_default=True,
                     help="A .png file, a folder (ending in /), or a template with {seed} {index} {prompt}."),
        click.option("--skip-existing", is_flag=True, help="Skip images already made with the same settings: rerun a "
                     "batch to finish it. Any other file at a planned name stops the run (unless --overwrite)."),
        click.option("--allow-outside-output", is_flag=True,
                     help="Let a prompt file's per-line output leave the -o folder."),
        click.option("--fail-fast", is_flag=True, help="Stop at the first failed item instead of going on."),
        click.option("--json", "json_lines", is_flag=True,
                     help="One JSON object per image (done, skipped, failed) on stdout."),
        click.option("--gpus", metavar="N|all", callback=_gpus_value,
                     help="Spread the batch over N GPUs of this machine (all: every GPU), one process per GPU, "
                     "each loading the model; --max-vram and the plan are per GPU. With --device cpu: N CPU "
                     "processes."),
    ]):
        fn = option(fn)
    return job_options(adapters.options(common_options(fn)))


def _gpus_value(_ctx, _param, value: str | None) -> str | None:
    if value is None or value == "all" or (value.isdigit() and int(value) >= 1):
        return value
    raise UsageError(f"--gpus {value!r} is not a number of GPUs: give N (1 or more) or all")


def _run_config(options: dict, **fixed) -> RunConfig:
    """Pop the run-wide options (flags, backend options, --max-vram) out of `options` into a RunConfig."""
    flags = tuple(backend.name for backend in backends.BACKENDS if options.pop(backend.name, False))
    backend_options = {}
    for backend in backends.BACKENDS:
        for option in backend.options:
            value = options.pop(option.name, None)
            if value is not None:
                if backend.name not in flags:
                    raise UsageError(f"{option.flag} needs {backend.flag}: add {backend.flag}, or drop {option.flag}")
                backend_options[option.name] = value
    return RunConfig(flags=flags, backend_options=backend_options, max_vram=options.pop("max_vram", None),
                     cuda_graphs=options.pop("cuda_graphs", True),
                     vae=options.pop("vae", None), adapters=adapters.from_options(options), **fixed)


def _jobs(prompt, prompt_file, fail_fast: bool, options: dict):
    """The jobs of a run: PROMPT, or every line of --prompt-file with PROMPT's options as defaults."""
    if prompt_file and prompt:
        raise UsageError("give either a PROMPT or --prompt-file, not both")
    job = Job(prompt=prompt or "", **options)
    if not prompt_file:
        validate(job)
        return [(None, job)], []
    from sdrun.prompt_file import read_prompt_file

    validate(dataclasses.replace(job, prompt="x"))
    jobs, bad_lines = read_prompt_file(prompt_file, job)
    if bad_lines and fail_fast:
        first = bad_lines[0]
        raise UsageError(f"{prompt_file} line {first.line}: {first.message}")
    return jobs, bad_lines


@cli.command()
@run_options
@click.option("--dry-run", is_flag=True, help="Print the render plan (stages, predicted peak memory) and stop; "
              "no weights are loaded.")
def run(prompt, prompt_file, model, config_dir, output, batch_size, device, quiet, overwrite, skip_existing,
        allow_outside_output, fail_fast, json_lines, gpus, dry_run, **options):
    """Make images from PROMPT (or from --prompt-file). This is the default command."""
    if overwrite and skip_existing:
        raise UsageError("--overwrite and --skip-existing contradict each other: choose one")
    run_config = _run_config(options, model=model, config_dir=config_dir, device=device, output=output,
                             batch_size=batch_size, overwrite=overwrite, skip_existing=skip_existing,
                             fail_fast=fail_fast, quiet=quiet, json_lines=json_lines,
                             allow_outside_output=allow_outside_output)
    jobs, bad_lines = _jobs(prompt, prompt_file, fail_fast, options)
    if gpus is not None and not dry_run:
        _launch(gpus, run_config, jobs, prompt_file)
    _generate(run_config, jobs, bad_lines, dry_run)


@cli.command("plan")
@run_options
def plan_command(prompt, prompt_file, model, config_dir, output, batch_size, device, quiet, overwrite,
                 skip_existing, allow_outside_output, fail_fast, json_lines, gpus, **options):
    """Print what `sdrun PROMPT [options]` would do, without loading weights: its stages, the predicted peak GPU
    memory of each, and with --max-vram the settings that fit. `--device cuda` predicts a CUDA GPU's plan on any
    machine. With --gpus every GPU runs the same plan on its share of the items: the figures are per GPU."""
    run_config = _run_config(options, model=model, config_dir=config_dir, device=device, output=output,
                             batch_size=batch_size, quiet=quiet, json_lines=json_lines)
    jobs, bad_lines = _jobs(prompt, prompt_file, fail_fast, options)
    _generate(run_config, jobs, bad_lines, dry_run=True, predict_only=True)
    if gpus is not None:
        click.echo(f"with --gpus {gpus}: each GPU loads the model and runs this plan on its share of the items; "
                   "the memory figures and --max-vram are per GPU")


def _launch(gpus: str, run_config: RunConfig, jobs, prompt_file: str | None) -> None:
    """`--gpus`: check the run here (one error line, not one per process), then start one process per GPU and
    end with the batch's exit code. One GPU needs no other process: the run goes on here."""
    from sdrun import parallel, pipeline
    from sdrun.batch import plan_items
    from sdrun.console import Reporter

    if parallel.launched():
        raise UsageError("--gpus was given to a process that a launcher started: drop --gpus (the launcher's "
                         "process count decides)")
    count = parallel.process_count(gpus, run_config.device)
    if count == 1:
        return
    if prompt_file == "-":
        raise UsageError("--gpus cannot share stdin between its processes: write the prompts to a file and give "
                         "--prompt-file FILE")
    planned = pipeline.plan_run(run_config, [job for _, job in jobs])
    plan_items(jobs, planned.run)  # names, folders, files in the way (the processes' own seeds may differ)
    args = parallel.without_gpus(click.get_current_context().meta["sdrun.args"])
    code = parallel.launch(count, args, Reporter(run_config.quiet, run_config.json_lines))
    sys.exit(code)


def _generate(run_config: RunConfig, jobs, bad_lines, dry_run: bool = False, predict_only: bool = False) -> None:
    from sdrun import parallel, pipeline
    from sdrun.console import Reporter

    group, jobs = parallel.join(run_config, jobs)  # random seeds drawn once (by process 0), planned and recorded
    main = group is None or group.main
    reporter = Reporter(run_config.quiet or not main, run_config.json_lines)
    planned = pipeline.plan_run(run_config, [job for _, job in jobs], predict_only)  # before anything is written
    if planned.added:
        reporter.note(planned.added_note())
    if dry_run:
        for line in planned.describe() if main else ():
            click.echo(line)
        return
    from sdrun.batch import plan_items, run_items  # the render, and with it diffusers: not for a plan

    items = plan_items(jobs, planned.run)
    if group is None:
        code = run_items(planned.run, items, bad_lines, reporter, planned).exit_code
    else:
        code = parallel.run_share(group, planned.run, items, bad_lines, reporter, planned)
    if code:
        sys.exit(code)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--set", "changes", multiple=True, metavar="KEY=VALUE",
              help=f"Change one setting ({', '.join(REPLAY_KEYS)}, model); also repairs a bad recorded one.")
@click.option("-o", "--output", help="Where to write  [default: IMAGE-replay.png beside IMAGE].")
@click.option("--without", "left_out", multiple=True, metavar="FLAG",
              help="Leave out a recorded flag (--without xformers: replay a GPU image on the CPU); repeatable. "
              "The image may differ slightly.")
@common_options
def replay(image, changes, output, left_out, device, quiet, overwrite, **options):
    """Make IMAGE again from its sdrun metadata: same model, seed, settings and flags."""
    from sdrun.output import read_metadata
    from sdrun.recorded import parse_changes, read_record

    meta = read_metadata(Path(image))
    recorded = read_record(meta, Path(image), parse_changes(changes))
    given = _run_config(options)
    dropped = _left_out(left_out, recorded.flags)
    flags = tuple(name for name in dict.fromkeys(recorded.flags + given.flags) if name not in dropped)
    kept_options = {name: value for name, value in recorded.backend_options.items()
                    if not any(name in (o.name for o in backends.BY_NAME[f].options) for f in dropped)}
    target = output or str(Path(image).with_name(Path(image).stem + "-replay.png"))
    run_config = RunConfig(model=recorded.model, config_dir=recorded.config_dir, vae=given.vae or recorded.vae,
                           device=device, flags=flags, backend_options={**kept_options, **given.backend_options},
                           max_vram=given.max_vram or recorded.max_vram, cuda_graphs=given.cuda_graphs, output=target,
                           batch_size=recorded.batch_size, overwrite=overwrite, quiet=quiet,
                           adapters=adapters.from_record(meta, Path(image)),
                           extra={"replayed_from": str(image)} | ({"left_out_flags": list(dropped)} if dropped else {}))
    _check_replay_device(image, run_config)
    _generate(run_config, [(None, recorded.job)], [])


def _check_replay_device(image: str, run: RunConfig) -> None:
    """A recorded CUDA-only flag on a machine without CUDA: the fix is --without, which only replay has."""
    from sdrun.pipeline import resolve_device

    if resolve_device(run.device).type != "cpu":
        return
    needing = [backends.BY_NAME[name] for name in run.flags if backends.BY_NAME[name].needs_cuda]
    if needing:
        raise UsageError(f"{image} was made with {' '.join(b.flag for b in needing)}, which "
                         f"need{'s' if len(needing) == 1 else ''} a CUDA GPU, and this replay runs on the CPU: add "
                         + " ".join(f"--without {b.name.replace('_', '-')}" for b in needing)
                         + " (the image may differ slightly), or replay where torch sees a GPU")


def _left_out(names: tuple[str, ...], recorded: tuple[str, ...]) -> tuple[str, ...]:
    """replay --without: backend names, each one the image was made with."""
    dropped = []
    for name in names:
        backend = backends.BY_NAME.get(name.removeprefix("--").replace("-", "_"))
        if backend is None:
            raise UsageError(f"--without {name}: no such flag; give one of "
                             + ", ".join(b.name.replace("_", "-") for b in backends.BACKENDS))
        if backend.name not in recorded:
            raise UsageError(f"--without {name}: the image was not made with {backend.flag}; its flags are "
                             + (" ".join(backends.BY_NAME[f].flag for f in recorded) or "none"))
        dropped.append(backend.name)
    return tuple(dict.fromkeys(dropped))


@cli.command()
@click.argument("latents", type=click.Path(dir_okay=False, exists=True))
@click.option("-o", "--output", help="Where to write  [default: the image name the latents were saved for].")
@common_options
def decode(latents, output, device, quiet, overwrite, **options):
    """Decode a LATENTS file (.latents.safetensors) that a run saved when it ran out of memory while decoding."""
    from sdrun.decode import decode_file

    decode_file(latents, output, overwrite, _run_config(options, device=device, quiet=quiet))


@cli.command("bench")
@click.option("-m", "--model", default=DEFAULT_MODEL, show_default=True, envvar="SDRUN_MODEL", show_envvar=True,
              help="The model to measure (as for `sdrun run`).")
@click.option("--size", type=FieldValue(BY_NAME["width"]), help="Square image side  [default: the model's].")
@click.option("--steps", type=FieldValue(BY_NAME["steps"]), default=20, show_default=True, help="Denoising steps.")
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True,
              help="Timed images per row (the best counts), after one warm-up image.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
def bench_command(model, size, steps, repeats, device):
    """Measure what each memory/speed flag buys on this GPU: seconds per image and peak memory, beside plain
    diffusers on the same model."""
    from sdrun.bench import report

    report(model, device, size, steps, repeats, click.echo)


@cli.command()
@click.option("--selftest/--no-selftest", default=True, show_default=True,
              help="Check the bundled kernel against PyTorch attention on this GPU.")
def info(selftest):
    """Versions, the GPU and its capability, the kernel build, and which flags can be used here."""
    from sdrun.info import report

    report(selftest)
