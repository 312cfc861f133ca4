"""The `moe-offload` command: a thin typer app over offload/ and cache/.

Every user-caused error is a MoEOffloadError; `main` prints it as one line and exits with code 2.
Progress bars and tables go to stderr, so `--json` leaves stdout to the JSON alone.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import re
import signal
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from cache.trace import read_trace
from offload.api import LoadOptions
from offload.generate import SamplingConfig
from offload.planner import resolve_device, slots_text
from offload.tokenizer import check_text
from quant.errors import MoEOffloadError
from quant.files import check_writable, refuse_overwriting

app = typer.Typer(
    name="moe-offload",
    help="Run Mixture-of-Experts models on small GPUs or none: experts stream through a per-layer cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"moe-offload {version('moe-offload')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """The app's own options, before a command (typer.Typer's help is the app's help)."""


# one line per message at any width; no markup, so that a path or message with [brackets] prints as it is
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
out = Console(highlight=False, soft_wrap=True)
if not out.is_terminal:  # pipes and logs: rich would assume 80 columns and cut the tables
    out.width = 120

# -- options shared by the commands that load a model (defaults live in offload.api.LoadOptions) -----

Model = Annotated[
    str,
    typer.Argument(metavar="MODEL", help="A quantized folder (from `quantize`), a Hugging Face folder, or a hub id."),
]
Slots = Annotated[
    int | None,
    typer.Option(
        "--slots",
        help="Expert slots per layer (1 to the experts per layer). On CUDA the default fills the GPU budget; "
        "on the CPU the default computes experts in place, and --slots routes them through K CPU slots "
        "that count exactly as GPU slots would.",
    ),
]
GpuMemory = Annotated[
    str | None, typer.Option(metavar="SIZE", help="GPU memory budget, e.g. 12GiB. Default: what is free.")
]
CpuMemory = Annotated[
    str | None,
    typer.Option(
        metavar="SIZE",
        help="RAM budget for the expert arena (and, on CUDA, the embedding table), e.g. 12GiB. Default: available.",
    ),
]
Device = Annotated[
    str, typer.Option(metavar="auto|cpu|cuda|cuda:N", help="cpu, cuda, cuda:N, or auto (cuda when available).")
]
Dtype = Annotated[
    str,
    typer.Option(
        metavar="auto|float32|float16|bfloat16",
        help="auto (bfloat16 from sm_80, float16 on older GPUs, float32 on CPU), float32, float16, bfloat16.",
    ),
]
ExpertBits = Annotated[
    str,
    typer.Option(metavar="2|3|4|none", help="HF folders only: quantize experts in memory to 2, 3 or 4 bits, or none."),
]
AttnBits = Annotated[
    str, typer.Option(metavar="4|8|none", help="HF folders only: quantize attention in memory to 4 or 8 bits, or none.")
]
AttnQuant = Annotated[
    str, typer.Option(metavar="hqq|bnb", help="Attention quantizer: hqq, or bnb (bitsandbytes NF4, 4-bit only).")
]
Prefetch = Annotated[
    str | None,
    typer.Option(
        metavar="none|early|late|both",
        help="Speculative prefetch: none; early (guess after each layer's attention); late (at its output); "
        f"both (early guess, corrected at the output). Default: {LoadOptions.prefetch}.",
        show_default=False,
    ),
]
PrefetchAhead = Annotated[
    int,
    typer.Option(
        help="Layers ahead the guess at each layer's output reaches (--prefetch late or both; bench: gate): 2 "
        "starts each load a layer earlier, from a first guess right less often that the next layer corrects."
    ),
]
NoPrefetch = Annotated[bool, typer.Option("--no-prefetch", help="Same as --prefetch none.")]
Policy = Annotated[
    str, typer.Option(metavar="lru|fifo|lfu|path", help="Eviction policy of the expert cache (see `simulate`).")
]
CacheMode = Annotated[
    str,
    typer.Option(
        metavar="auto|inclusive|exclusive",
        help="auto: keep every expert in RAM when it fits (inclusive), else each expert once across GPU slots "
        "and RAM, swapping on a miss (exclusive). Force either one with inclusive or exclusive.",
    ),
]
MaxSeqLen = Annotated[int | None, typer.Option(help="Context size. Default: the model's, at most 4096.")]
FusedGemv = Annotated[
    bool | None,
    typer.Option(
        "--fused-gemv/--no-fused-gemv",
        help="Decode's quantized products through a fused dequantize+GEMV kernel, or dequantize then multiply. "
        "Default: fused where it runs: on CUDA, Triton's (CUDA builds of torch ship it); on the CPU, a C kernel "
        "built on first use with the machine's compiler (cc, gcc or clang) and kept in ~/.cache/moe-offload.",
        show_default=False,
    ),
]
CudaGraphs = Annotated[
    bool | None,
    typer.Option(
        "--cuda-graphs/--no-cuda-graphs",
        help="Replay decode's resident part (attention, norms, router, guesses, head) as CUDA graphs, or "
        "launch every kernel from Python. Default: graphs on CUDA.",
        show_default=False,
    ),
]
HostEmbedding = Annotated[
    bool | None,
    typer.Option(
        "--host-embedding/--no-host-embedding",
        help="Keep the embedding table in RAM, where the GPU reads each token's row in place, and give its GPU "
        "memory to expert slots (262 MB on Mixtral-8x7B: four 2-bit slots). Default: on CUDA, unless the "
        "model's lm_head is the same table.",
        show_default=False,
    ),
]
MetaRows = Annotated[
    bool | None,
    typer.Option(
        "--meta-rows/--no-meta-rows",
        help="On CUDA, hold each expert's 8-bit scales and zeros by packed row, which the fused kernel reads in "
        "fewer, wider loads that it copies ahead of use; experts are repacked from the files' order as they load. "
        "Default: off until timed on a GPU. On the CPU they lie by output, for its own loop.",
        show_default=False,
    ),
]
PrefillChunk = Annotated[
    int,
    typer.Option(
        help="Prompt tokens each layer's attention, and each expert, takes at once: a long prompt's activations "
        "grow with this, not with the prompt, and the memory plan keeps them free. A smaller chunk keeps less "
        "back but dequantizes an expert once per chunk of its tokens.",
    ),
]
Verify = Annotated[
    bool,
    typer.Option(
        "--verify/--no-verify",
        help="Check a quantized folder's sha256 sums on load (about 20 s for 2-bit Mixtral-8x7B's 18 GB on 2 "
        "cores); --no-verify checks that every file is there at its size.",
    ),
]
MaxNewTokens = Annotated[int, typer.Option(help="Tokens to generate at most.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of tokens with this mass.")]
Seed = Annotated[int | None, typer.Option(help="Random seed, for repeatable sampling.")]


# the options a command that loads a model may offer: name -> (typer annotation, default: LoadOptions' own)
LOAD_OPTIONS: dict[str, tuple[object, object]] = {
    "slots": (Slots, LoadOptions.slots),
    "gpu_memory": (GpuMemory, LoadOptions.gpu_memory),
    "cpu_memory": (CpuMemory, LoadOptions.cpu_memory),
    "device": (Device, LoadOptions.device),
    "dtype": (Dtype, LoadOptions.dtype),
    "expert_bits": (ExpertBits, LoadOptions.expert_bits),
    "attn_bits": (AttnBits, LoadOptions.attn_bits),
    "attn_quant": (AttnQuant, LoadOptions.attn_quant),
    "prefetch": (Prefetch, None),  # None: LoadOptions' own, unless --no-prefetch (None tells it from an explicit one)
    "prefetch_ahead": (PrefetchAhead, LoadOptions.prefetch_ahead),
    "no_prefetch": (NoPrefetch, False),
    "policy": (Policy, LoadOptions.policy),
    "cache_mode": (CacheMode, LoadOptions.cache_mode),
    "max_seq_len": (MaxSeqLen, LoadOptions.max_seq_len),
    "fused_gemv": (FusedGemv, LoadOptions.fused_gemv),
    "cuda_graphs": (CudaGraphs, LoadOptions.cuda_graphs),
    "host_embedding": (HostEmbedding, LoadOptions.host_embedding),
    "meta_rows": (MetaRows, LoadOptions.meta_rows),
    "prefill_chunk": (PrefillChunk, LoadOptions.prefill_chunk),
    "verify": (Verify, LoadOptions.verify),
}


def loads_model(*names: str, helps: dict[str, str] | None = None):
    """Give a command the load options `names` (all of them when none are named), after its own.

    The command takes a `load` parameter instead: a dict of LoadOptions keywords, with --no-prefetch
    folded into prefetch. One declaration per option, here, for every command; `helps` replaces an
    option's help where this command gives it another meaning or default.
    """
    names = names or tuple(LOAD_OPTIONS)
    helps = helps or {}

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # typer reads real annotations, not strings
        own = [p for p in signature.parameters.values() if p.name != "load"]
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=_with_help(LOAD_OPTIONS[name][0],
                              helps.get(name)), default=LOAD_OPTIONS[name][1])
            for name in names
        ]  # fmt: skip

        @functools.wraps(command)
        def run(**arguments):
            load = {name: arguments.pop(name) for name in names}
            if "prefetch" in load:
                load["prefetch"] = _prefetch(load["prefetch"], load.pop("no_prefetch", False))
            return command(**arguments, load=load)

        run.__signature__ = signature.replace(parameters=own + added)
        return run

    return decorate


def _prefetch(prefetch: str | None, no_prefetch: bool) -> str:
    """--prefetch and --no-prefetch as one choice; both given, and disagreeing, is an error."""
    if no_prefetch and prefetch not in (None, "none"):
        raise MoEOffloadError(f"--no-prefetch and --prefetch {prefetch} disagree: give one of them")
    return "none" if no_prefetch else prefetch or LoadOptions.prefetch


def _with_help(annotation, help_text: str | None):
    """`Annotated[type, typer.Option(...)]` with another help, or as it is."""
    if help_text is None:
        return annotation
    kind, option = typing.get_args(annotation)
    option = copy.copy(option)
    option.help = help_text
    return Annotated[kind, option]


def _load(model: str, options: dict, text: str | None = None):
    """The model, with a progress bar over its experts; `text` as offload.api.prepare takes it."""
    from offload.api import load

    with _progress() as progress:
        return load(model, progress=_bar(progress, "loading experts"), text=text, **options)


def _bar(progress: Progress, description: str) -> Callable[[str, int, int], None]:
    """A new bar in `progress`, and the (what, done, total) callback that moves it (offload.convert.Progress)."""
    task = progress.add_task(description, total=None)
    return lambda what, done, total: progress.update(task, completed=done, total=total)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # no bars in logs and pipes
    )


def _print_stats(stats, console: Console = err, per_layer: bool = True) -> None:
    """The run's figures: totals, then (`per_layer`) one row per layer. Experts computed in place have no cache
    to count: every request would show as a hit (RunStats.in_place)."""
    if stats.in_place:
        console.print(f"{stats.summary()} · experts computed in place: no cache to count (--slots K routes them "
                      "through K slots a layer)")  # fmt: skip
        return
    console.print(stats.summary())
    if not per_layer:
        return
    s = stats.to_dict()
    table = Table("layer", "requests", "hits", "misses", "hit rate", "prefetch used/issued", "recall", "MiB in")
    for layer, row in enumerate(s["per_layer"]):
        table.add_row(
            str(layer),
            str(row["requests"]),
            str(row["hits"]),
            str(row["misses"]),
            f"{row['hit_rate']:.3f}",
            f"{row['prefetches_used']}/{row['prefetches_issued']}",
            "-" if row["recall"] is None else f"{row['recall']:.3f}",
            f"{row['h2d_bytes'] / 2**20:.1f}",
        )
    console.print(table)


# -- commands ------------------------------------------------------------------------------------------


@app.command()
def quantize(
    src: Annotated[str, typer.Argument(metavar="SRC", help="A Hugging Face folder (safetensors) or hub id.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="The folder to write. Re-running after a kill resumes.")],
    revision: Annotated[
        str | None,
        typer.Option(help="A hub id's branch, tag or commit (default: main); the manifest keeps the commit."),
    ] = None,
    expert_bits: Annotated[
        str, typer.Option(metavar="2|3|4|none", help="Experts: 2 (group 16, 8-bit scales), 3, 4 or none.")
    ] = "2",
    attn_bits: Annotated[str, typer.Option(metavar="4|8|none", help="Attention projections: 4, 8 or none.")] = "4",
    attn_quant: AttnQuant = LoadOptions.attn_quant,
    device: Annotated[
        str,
        typer.Option(help="Where hqq runs: auto (CUDA when there is one: seconds per layer, not minutes), cpu, cuda."),
    ] = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite OUT if it already holds files.")] = False,
) -> None:
    """Quantize a checkpoint into moe-offload's folder: packed experts, resident weights, a manifest."""
    from offload.convert import quantize_model

    with _progress() as progress, _resumable(out):
        folder = quantize_model(
            src,
            out,
            revision=revision,
            expert_bits=expert_bits,
            attn_bits=attn_bits,
            attn_quant=attn_quant,
            device=device,
            force=force,
            progress=_bar(progress, "quantizing layers"),
        )
    err.print(f"wrote {folder}")


@app.command()
@loads_model()
def generate(
    model: Model,
    prompt: Annotated[str | None, typer.Option(help="The text to continue.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the text to continue from this file (UTF-8; - reads standard input).")
    ] = None,
    max_new_tokens: MaxNewTokens = SamplingConfig.max_new_tokens,
    temperature: Temperature = SamplingConfig.temperature,
    top_p: TopP = SamplingConfig.top_p,
    seed: Seed = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print the cache and speed figures after the text.")] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help='Print only {"text", "token_ids", "stop_reason", "stats"} as one JSON object.'),
    ] = False,
    load: dict | None = None,
) -> None:
    """Continue a prompt, streaming the text as it is generated. Ctrl-C stops it (with --stats, after the figures)."""
    prompt = _read_prompt(prompt, prompt_file)  # before the load: minutes on a real model
    loaded = _load(model, load, text="plain")
    with stop_on_ctrl_c() as pressed:
        result = loaded.generate(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            on_text=None if as_json else write_text, stop=pressed,
        )  # fmt: skip
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids, "stop_reason": result.stop_reason,
                          "stats": loaded.stats.to_dict()}))  # fmt: skip
    else:
        write_text("\n")
    if result.stop_reason == "stopped":
        err.print("(stopped)")
    _note_a_full_context(result, max_new_tokens, loaded.max_seq_len)
    if stats and not as_json:
        _print_stats(loaded.stats)
    if result.stop_reason == "stopped":
        raise typer.Exit(130)  # as a shell reports SIGINT


@contextlib.contextmanager
def _resumable(out: Path) -> Iterator[None]:
    """Ctrl-C in quantize or synth says how to go on: every file written is kept, and the journal resumes."""
    try:
        yield
    except KeyboardInterrupt:
        err.print(f"(interrupted: {out} is unfinished; run the same command again to resume it)")
        raise typer.Exit(130) from None


def _read_prompt(prompt: str | None, prompt_file: Path | None) -> str:
    """--prompt TEXT or --prompt-file FILE (- for standard input): exactly one, checked as text."""
    if (prompt is None) == (prompt_file is None):
        raise MoEOffloadError("give --prompt TEXT or --prompt-file FILE" + (", not both" if prompt is not None else ""))
    if prompt_file is not None:
        where = "standard input" if str(prompt_file) == "-" else str(prompt_file)
        try:
            if str(prompt_file) == "-" and sys.stdin is None:
                raise MoEOffloadError("--prompt-file -: there is no standard input to read")
            data = sys.stdin.buffer.read() if str(prompt_file) == "-" else prompt_file.read_bytes()
            prompt = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MoEOffloadError(f"{where} is not UTF-8 text: the byte 0x{data[error.start]:02x} at byte "
                                  f"{error.start}") from None  # fmt: skip
        except OSError as error:
            raise MoEOffloadError(f"cannot read --prompt-file {where}: {error.strerror or error}") from None
    check_text(prompt, "the prompt")
    return prompt


def write_text(text: str) -> None:
    """Generated text to stdout as it is: rich would expand tabs, turn :smile: into an emoji and drop a \r."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _note_a_full_context(result, max_new_tokens: int, max_seq_len: int) -> None:
    """A generation cut short by the context's end, not by --max-new-tokens, says so (both are "length")."""
    if result.stop_reason == "length" and len(result.token_ids) < max_new_tokens:
        err.print(f"(the context of {max_seq_len} tokens is full after {len(result.token_ids)} new tokens; "
                  "raise --max-seq-len for more)")  # fmt: skip


@contextlib.contextmanager
def stop_on_ctrl_c() -> Iterator[Callable[[], bool]]:
    """Within, Ctrl-C asks a generation to stop: the function yielded, a generation's `stop`, says whether it
    was pressed, so the generation ends between decode steps, where the model's state is whole (a
    KeyboardInterrupt inside a step costs the expert cache). A second Ctrl-C interrupts at once."""
    presses = []

    def on_sigint(signum, frame) -> None:
        if presses:
            raise KeyboardInterrupt
        presses.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(presses)
    finally:
        signal.signal(signal.SIGINT, previous)


@app.command()
@loads_model()
def chat(
    model: Model,
    system: Annotated[str | None, typer.Option(help="A system prompt.")] = None,
    max_new_tokens: MaxNewTokens = SamplingConfig.max_new_tokens,
    temperature: Temperature = SamplingConfig.temperature,
    top_p: TopP = SamplingConfig.top_p,
    seed: Seed = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print the figures after every answer.")] = False,
    load: dict | None = None,
) -> None:
    """Chat in the terminal through the model's chat template. Type /stats, /reset or /exit; Ctrl-C stops a reply."""
    loaded = _load(model, load, text="chat")
    messages: list[dict] = [] if system is None else [{"role": "system", "content": system}]
    err.print("chat: /stats shows the figures, /reset starts over, /exit leaves; Ctrl-C stops a reply")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        except UnicodeDecodeError:  # a terminal in another encoding, or binary piped in
            err.print("error: that line is not UTF-8 text")
            continue
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/stats":
            _print_stats(loaded.stats)
            continue
        if command == "/reset":
            messages = messages[:1] if system is not None else []
            loaded.reset_stats()
            err.print("(conversation and figures reset)")
            continue
        if not command:
            continue
        if re.fullmatch(r"/[a-z]+", command):  # a mistyped command is not a message to send
            err.print(f"unknown command {command}: the commands are /stats, /reset and /exit (a message that starts "
                      "with / is sent as one when it has more words)")  # fmt: skip
            continue
        messages.append({"role": "user", "content": line})
        try:
            with stop_on_ctrl_c() as pressed:
                result = loaded.generate(
                    messages=messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    seed=seed, on_text=write_text, stop=pressed,
                )  # fmt: skip
        except MoEOffloadError as error:  # e.g. the conversation outgrew the context: say so, keep chatting
            messages.pop()
            err.print(f"error: {error}")
            continue
        write_text("\n")
        if result.stop_reason == "stopped":  # the conversation goes on without this turn
            messages.pop()
            err.print("(stopped)")
            continue
        messages.append({"role": "assistant", "content": result.text})
        _note_a_full_context(result, max_new_tokens, loaded.max_seq_len)
        if stats:  # after every answer: the totals (/stats adds the layers)
            _print_stats(loaded.stats, per_layer=False)


@app.command()
@loads_model()
def info(
    model: Model,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the facts as one JSON object: snake_case keys, sizes in bytes."),
    ] = False,
    load: dict | None = None,
) -> None:
    """Show the model's family, sizes, quantization and memory plan, without loading the experts."""
    from offload.api import describe, facts, prepare

    prepared = prepare(model, **load)
    if as_json:
        print(json.dumps(facts(prepared)))
        return
    table = Table(show_header=False)
    for key, value in describe(prepared).items():
        table.add_row(key, str(value))
    out.print(table)


def _slots_phrase(slots) -> str:
    """'5 slots per layer', or 'slots: 6 in layers 0-1, 5 in layers 2-31 (162 in all)'."""
    text = slots_text(slots)
    return f"{text} slots per layer" if len(set(slots)) == 1 else f"slots: {text}"


@app.command()
@loads_model()
def trace(
    model: Model,
    out: Annotated[Path, typer.Option("--out", help="The trace to write (.jsonl).")],
    prompt: Annotated[str | None, typer.Option(help="One prompt.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="A text file with one prompt per line.")] = None,
    max_new_tokens: MaxNewTokens = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 (the default here) is greedy.")] = 0.0,
    seed: Seed = None,
    load: dict | None = None,
) -> None:
    """Record the routing of real prompts: per sequence, token and layer, the experts, gate weights and guesses."""
    if (prompt is None) == (prompts is None):
        both = ", not both" if prompt is not None else ""
        raise MoEOffloadError(f"give --prompt TEXT or --prompts FILE (one prompt per line){both}")
    if prompts is not None:
        if prompts.is_dir():
            raise MoEOffloadError(f"--prompts {prompts} is a folder; give a text file with one prompt per line")
        if not prompts.exists():
            raise MoEOffloadError(f"no such prompts file: {str(prompts)!r}")
        refuse_overwriting(out, "--out", prompts, "the prompts file")
        try:
            texts = [line for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise MoEOffloadError(f"{prompts} is not UTF-8 text; write one prompt per line") from None
        except OSError as error:
            raise MoEOffloadError(f"cannot read {prompts}: {error.strerror or error}") from None
        if not texts:
            raise MoEOffloadError(f"{prompts} holds no prompt; write one prompt per line")
    else:
        texts = [prompt]
    for number, text in enumerate(texts, 1):  # before the load: minutes on a real model
        check_text(text, f"prompt {number}" if len(texts) > 1 else "the prompt")
    check_writable(out, "--out")
    refuse_overwriting(out, "--out", model, "the model")  # its config.json, say
    loaded = _load(model, load, text="plain")
    done = [0]  # prompts traced, kept here: a disabled bar (a pipe, a log) keeps nothing

    with _progress() as progress:
        bar = _bar(progress, "tracing prompts")

        def advance(what: str, finished: int, total: int) -> None:
            done[0] = finished
            bar(what, finished, total)

        try:
            path = loaded.trace(texts, out, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                progress=advance)  # fmt: skip
        except KeyboardInterrupt:
            err.print(f"(interrupted after {done[0]} of {len(texts)} prompts: no trace written, as it is written "
                      "whole)")  # fmt: skip
            raise typer.Exit(130) from None
    total, slots = loaded.stats.total, loaded.plan.slots_per_layer
    where = "no slots (experts computed in place)" if slots is None else _slots_phrase(slots)
    sequences = f"{len(texts)} sequence{'s' if len(texts) > 1 else ''}"
    err.print(f"wrote {path}: {sequences}, {loaded.stats.decode_tokens} decode tokens, "
              f"hit rate {total.hit_rate:.3f} with {where}")  # fmt: skip


@app.command()
def synth(
    out: Annotated[
        Path, typer.Argument(metavar="OUT", help="The folder to write (a quantized folder with random codes).")
    ],
    preset: Annotated[
        str,
        typer.Option(
            metavar="mixtral-8x7b|mixtral-small|tiny",
            help="mixtral-8x7b (full size: 18.4 GB at 2-bit), mixtral-small (CPU benchmarks: 410 MB) or tiny.",
        ),
    ] = ("mixtral-8x7b"),
    expert_bits: Annotated[str, typer.Option(metavar="2|3|4|none", help="Experts: 2, 3, 4 or none.")] = "2",
    attn_bits: Annotated[str, typer.Option(metavar="4|8|none", help="Attention projections: 4, 8 or none.")] = "4",
    layers: Annotated[
        int | None, typer.Option(help="Override the preset's layer count (e.g. to match a trace).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed writes the same bytes.")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite OUT if it already holds files.")] = False,
) -> None:
    """Write a synthetic model of real shapes straight in our format: speed without the real weights."""
    from offload.synth import synthesize

    with _progress() as progress, _resumable(out):
        folder = synthesize(out, preset, expert_bits=expert_bits, attn_bits=attn_bits, layers=layers, seed=seed,
                            force=force, progress=_bar(progress, "writing layers"))  # fmt: skip
    err.print(f"wrote {folder}")


@app.command()
@loads_model(
    "slots", "gpu_memory", "cpu_memory", "device", "dtype", "expert_bits", "attn_bits", "attn_quant", "policy",
    "cache_mode", "max_seq_len", "fused_gemv", "cuda_graphs", "prefill_chunk", "host_embedding", "prefetch_ahead",
    "meta_rows", "verify",
    helps={
        "slots": "Expert slots per layer (top-k to the experts per layer). On CUDA the default fills the GPU "
        "budget. On the CPU, K slots run the expert cache and count it exactly as GPU slots would; without "
        "them bench times direct mode, every expert computed in place (the CPU's default), and reports no "
        "cache figures.",
        "max_seq_len": "Context size. Default: what the run needs (the prompt, 2 warm-up steps, --tokens and one "
        "more).",
    },
)  # fmt: skip
def bench(
    model: Model,
    tokens: Annotated[int, typer.Option(help="Decode tokens to time.")] = 128,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens for the prefill.")] = 16,
    route_trace: Annotated[
        Path | None,
        typer.Option(
            help="Replay the routing of this trace (e.g. ../shared/traces/...jsonl) instead of the "
            "model's routers: real hit rates on a synthetic model."
        ),
    ] = None,
    prefetch: Annotated[
        str,
        typer.Option(
            metavar="gate|oracle|none",
            help="gate: the model's own guess (meaningless with --route-trace, reported as replayed); "
            "oracle: the coming layers' experts read from the trace (an upper bound); none.",
        ),
    ] = "gate",
    oracle_depth: Annotated[
        int | None,
        typer.Option(
            help="Layers ahead the oracle starts loading, on into the next token (default: every layer but "
            "one, which keeps the link busy through layers that miss nothing; 1: the gate's reach)."
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(
            help="Also run, on the same checkpoint and budget: no cache, LRU without and with prefetch, "
            "and transformers/accelerate device_map offloading where it can run."
        ),
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results to this JSON file.")] = None,
    load: dict | None = None,
) -> None:
    """Time prefill and decode through the expert cache, and compare with the PCIe/compute bound (on the CPU
    without --slots: the speed of direct mode alone)."""
    from offload import bench as benchmark

    benchmark.check_run(prompt_tokens, tokens, load["max_seq_len"])  # before the load: minutes on a real model
    ahead = load.pop("prefetch_ahead")
    benchmark.check_prefetch_options(prefetch, ahead, oracle_depth)  # before the load: minutes on a real model
    direct = load["slots"] is None and resolve_device(load["device"]).type == "cpu"
    benchmark.check_direct(direct, prefetch, compare, ahead)
    if json_out is not None:
        if str(json_out) == "-":  # not stdout: the table is printed there
            raise MoEOffloadError("--json takes a file name, not -: bench prints its table on stdout")
        check_writable(json_out, "--json")
        refuse_overwriting(json_out, "--json", model, "the model")  # its manifest.json, say
        if route_trace is not None:
            refuse_overwriting(json_out, "--json", route_trace, "the trace being replayed")
    if route_trace is not None:
        read_trace(route_trace)  # its errors too: the replay reads it again after the load
    # bench sets the prefetch itself
    context = benchmark.bench_context(prompt_tokens, tokens)
    asked = load["max_seq_len"]
    load = {**load, "prefetch": "none", "max_seq_len": context if asked is None else asked}
    with warnings.catch_warnings():
        if asked is None:  # bench's own context past the trained positions: the speed is the same, the text unread
            warnings.filterwarnings("ignore", message=r"a context of \d+ tokens \(--max-seq-len\) is beyond")
        loaded = _load(model, load)
    accelerate = None
    if compare and route_trace is None and not loaded.source.folder.joinpath("manifest.json").exists():

        def accelerate() -> dict:
            return benchmark.accelerate_baseline(
                model, device=loaded.device, dtype=loaded.dtype, tokens=tokens, prompt_tokens=prompt_tokens,
                gpu_budget=None if load["gpu_memory"] is None else loaded.plan.device_budget,  # as planned: at most
                cpu_budget=None if load["cpu_memory"] is None else loaded.plan.host_budget,  # what is free
            )  # fmt: skip

    result = benchmark.bench(loaded, tokens=tokens, prompt_tokens=prompt_tokens,
                             route_trace=None if route_trace is None else str(route_trace), prefetch=prefetch,
                             oracle_depth=oracle_depth, prefetch_ahead=ahead, compare=compare,
                             accelerate=accelerate)  # fmt: skip
    _print_bench(result)
    if json_out is not None:
        benchmark.write_json(json_out, result, "--json")
        err.print(f"wrote {json_out}")


@app.command()
@loads_model(
    "device", "dtype", "expert_bits", "attn_bits", "attn_quant", "meta_rows", "verify",
    helps={"meta_rows": "Tune the experts' matrices with their scales and zeros by packed row, as a run with "
           "--meta-rows holds them (their launches are kept apart from grid order's). Default: as a run does."},
)  # fmt: skip
def tune(model: Model, load: dict | None = None) -> None:
    """Time the fused GEMV kernel's variants, launch shapes and splits of K on this GPU, for each shape of MODEL's
    quantized matrices, and keep the fastest: from then on, every run on this GPU uses them (delete the file it
    names to go back to the built-in launches). A few minutes; needs a CUDA GPU."""
    from offload.bench import provenance
    from offload.tune import tune_model
    from quant.gemv import FLAGS

    with _progress() as progress:
        task = progress.add_task("tuning", total=None)

        def moved(what: str, done: int, total: int) -> None:
            progress.update(task, description=f"tuning {what}", completed=done, total=total)

        try:
            tuned = tune_model(model, **load, progress=moved, about=provenance())
        except KeyboardInterrupt:
            err.print("(interrupted: the shapes tuned before it are saved, and decode runs them; the others keep "
                      "the built-in launches until a tune runs to the end)")  # fmt: skip
            raise typer.Exit(130) from None
    table = Table("shape", "matrices", "default us", "tuned us", "speedup", "launch")
    for key, result in tuned.results.items():
        launch = result["launch"]
        shape = f"{launch['block_n']}x{launch['block_k']}, {launch['num_warps']} warps"
        if launch["split_k"] > 1:
            shape += f", K split {launch['split_k']} ways"
        flags = [name for name in FLAGS if launch[name]]
        names = result["matrices"]
        table.add_row(key, ", ".join(names[:3]) + (f" (+{len(names) - 3})" if len(names) > 3 else ""),
                      f"{result['default_us']:.1f}", f"{result['us']:.1f}",
                      f"{result['default_us'] / result['us']:.2f}x",
                      f"{shape}, {launch['stages']} stages" + "".join(f", {flag}" for flag in flags))  # fmt: skip
    out.print(f"fused dequantize+GEMV launches on {tuned.device}, one token of {tuned.dtype}")
    out.print(table)
    err.print(f"wrote {tuned.path}: decode on this GPU now runs these launches")


def _prefetch_phrase(prefetch: dict) -> str:
    """`oracle, 31 layers ahead`, `gate, 1 layer ahead` or `none`."""
    reach = prefetch.get("depth") if prefetch["mode"] == "oracle" else prefetch.get("ahead")
    if reach is None:
        return prefetch["mode"]
    return f"{prefetch['mode']}, {reach} layer{'' if reach == 1 else 's'} ahead"


def _print_bench(result: dict) -> None:
    if result["mode"] == "direct":
        out.print(f"{result['model']} on {result['device']}")
        out.print(f"routing: {result['routing']} · direct mode: every expert computed in place, no cache "
                  f"· {result['kernel']}")  # fmt: skip
        table = Table("run", "prefill tok/s", "decode tok/s", "ms/token")
        table.add_row("measured", f"{result['prefill_tokens_per_s']:.2f}", f"{result['decode_tokens_per_s']:.2f}",
                      f"{result['compute_s_per_token'] * 1000:.1f}")  # fmt: skip
        out.print(table)
        return
    table = Table("run", "tok/s", "bound", "of bound", "hit rate", "recall", "MiB/token", "stall s")
    notes = []
    for name, r in {"measured": result, **result.get("baselines", {})}.items():
        if "hit_rate" not in r:  # a baseline that could not run here says why
            table.add_row(name, "-" if r.get("decode_tokens_per_s") is None else str(r["decode_tokens_per_s"]),
                          *["-"] * 6)  # fmt: skip
            notes.append(f"{name}: {r.get('note', '')}")
            continue
        recall = r["prefetch"]["recall"]
        table.add_row(
            name, f"{r['decode_tokens_per_s']:.2f}", f"{r['bound_tokens_per_s']:.2f}", f"{r['fraction_of_bound']:.2f}",
            f"{r['hit_rate']:.3f}", "-" if recall is None else f"{recall:.3f}",
            f"{r['h2d_bytes_per_token'] / 2**20:.1f}", f"{r['stall_s']:.3f}",
        )  # fmt: skip
    out.print(f"{result['model']} on {result['device']}")
    slots = _slots_phrase(result["slots_per_layer"])
    out.print(f"routing: {result['routing']} · {result['mode']} mode, {slots} "
              f"· prefetch {_prefetch_phrase(result['prefetch'])} · H2D {result['h2d_bandwidth_gbps']:.2f} GB/s "
              f"· compute {result['compute_s_per_token'] * 1000:.1f} ms/token · {result['kernel']}"
              + (" · meta by packed row" if result.get("meta_order") == "row" else "")
              + (" · CUDA graphs" if result["cuda_graphs"] else "")
              + (" · embedding in RAM" if result.get("host_embedding") else ""))  # fmt: skip
    out.print(table)
    for note in notes:
        out.print(note)


@app.command()
def demo(
    slots: Annotated[int, typer.Option(help="Expert slots per layer in the demo's CPU cache.")] = 2,
    tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
) -> None:
    """Offline: write a tiny random Mixtral, quantize it, run it through the expert cache, show the figures."""
    import tempfile

    from offload.demo import check_options, run_demo

    check_options(slots=slots, tokens=tokens)
    with tempfile.TemporaryDirectory(prefix="moe-offload-demo-") as workdir:
        err.print("writing a random 4-layer Mixtral (8 experts, top 2) in the hub's layout, quantizing it to 4-bit ...")
        run = run_demo(Path(workdir), slots=slots, tokens=tokens)
        out.print(f"runtime vs transformers, unquantized: max |logit diff| {run.exact_error:.1e}")
        out.print(f"runtime vs transformers, 4-bit experts and attention: max |logit diff| {run.quantized_error:.2f} "
                  f"of logits up to {run.logit_range:.1f}; the same top token at {run.same_top} of "
                  f"{len(run.prompt_ids)} positions")  # fmt: skip
        out.print(f"prompt ids:    {run.prompt_ids}")
        out.print(f"generated ids: {run.token_ids}")
        _print_stats(run.model.stats, out)
        out.print("Random weights make no text; try `moe-offload generate MODEL --prompt ... --slots 2 --stats`.")


def _register_lab() -> None:
    from cli import lab

    lab.register(app)


_register_lab()


def main(argv: list[str] | None = None) -> int:
    """The console script: user errors become one line on stderr and exit code 2 (as usage errors do), and
    warnings (a fallback: pageable memory, no C compiler for the CPU's kernel) one line "warning: ..."."""
    with warnings.catch_warnings():  # restores Python's own display on the way out
        warnings.showwarning = _one_line_warning
        try:
            app(args=argv, prog_name="moe-offload")  # click handles usage errors, --help and Ctrl-C itself
        except MoEOffloadError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except SystemExit as done:
            return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr if file is None else file)


if __name__ == "__main__":
    sys.exit(main())
