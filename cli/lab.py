"""The cache lab's commands: `moe-offload simulate TRACE` replays a routing trace through the policies;
`moe-offload timeline TRACE` times a decode of it from measured costs.

Thin over cache/: reading is cache.trace, replaying is cache.simulate and cache.timeline. The lead's
cli/app.py calls `register(app)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from cache.policies import ONLINE_POLICIES, POLICIES
from cache.predictors import PREFETCH_CHOICES, check_predictor
from cache.simulate import SimResult, simulate
from cache.table import check_mode
from cache.timeline import H100, Costs, TimedRun, timeline
from cache.trace import MAX_ID, read_trace
from quant.errors import MoEOffloadError
from quant.files import check_writable, refuse_overwriting, write_atomically


def register(app: typer.Typer) -> None:
    """Add the `simulate` and `timeline` commands to `app`."""
    app.command("simulate", help=SIMULATE_HELP)(simulate_command)
    app.command("timeline", help=TIMELINE_HELP)(timeline_command)


SIMULATE_HELP = (
    "Replay TRACE through cache policies and print the hit rate per policy and slot count. "
    "One cache per layer, empty at each new sequence (with --cache-mode exclusive, full from the start, as the "
    "runtime's exclusive mode keeps it); a request (one token's experts at one layer) is "
    "served as a unit, by the same SlotTable the runtime uses. Hit rate = hits / experts asked for."
)


def simulate_command(
    trace: Path = typer.Argument(
        ...,
        metavar="TRACE",
        help="A routing trace (.jsonl): ../shared/traces' format, or one written by `moe-offload trace`.",
    ),
    policy: str = typer.Option(
        None,
        "--policy",
        help=f"Comma-separated eviction policies ({', '.join(POLICIES)}). Default: every online one, plus belady.",
    ),
    slots: str = typer.Option("1-8", "--slots", help="Slots per layer: a number, a range (1-8), or a list (2,4,6)."),
    per_layer: bool = typer.Option(False, "--per-layer", help="Add a row per layer under each policy."),
    prefetch: str = typer.Option(
        "none",
        "--prefetch",
        metavar="|".join(PREFETCH_CHOICES),
        help="Prefetch predictor for layer l+1, guessed once layer l is known: " + "|".join(PREFETCH_CHOICES) + ".",
    ),
    mode: str = typer.Option(
        "inclusive",
        "--cache-mode",
        metavar="inclusive|exclusive",
        help="inclusive (empty at each sequence), or exclusive: the slots start with experts 0..K-1 and stay "
        "full, as the runtime's exclusive mode (replay a trace it recorded with the mode it ran).",
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help='Print only {"num_layers": ..., "sequences": ..., "skipped_tokens": ..., "results": [...]} on stdout.',
    ),
    plot: Path = typer.Option(
        None, "--plot", help="Write a plot of hit rate against slots, one line per policy: .png, .pdf, .svg, ..."
    ),
) -> None:
    """`moe-offload simulate`: see SIMULATE_HELP."""
    try:
        policies = _parse_policies(policy)
        slot_counts = _parse_slots(slots)
        if plot is not None:
            refuse_overwriting(plot, "--plot", trace, "the trace being read")
            plot_format = _plot_format(plot)
            check_writable(plot, "--plot")
        check_predictor(prefetch)
        check_mode(mode)
        routing = read_trace(trace)
        if max(slot_counts) > routing.num_experts:
            raise MoEOffloadError(f"--slots {slots!r} goes past the trace's {routing.num_experts} experts per layer: "
                                  f"write e.g. 1-{routing.num_experts}")  # fmt: skip
        results = [simulate(routing, name, count, prefetch=prefetch, mode=mode) for name in policies
                   for count in slot_counts]  # fmt: skip
        if plot is not None:
            write_plot(results, plot, title=f"{trace.name} (prefetch: {prefetch})", plot_format=plot_format)
    except MoEOffloadError as error:
        Console(stderr=True, soft_wrap=True).print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(2) from None

    if as_json:
        results_json = [r.to_dict(per_layer=per_layer) for r in results]
        typer.echo(json.dumps({"num_layers": routing.num_layers, "sequences": len(routing.sequence_ids),
                               "skipped_tokens": routing.skipped_tokens, "results": results_json}))  # fmt: skip
        return
    console = Console()
    console.print(
        f"{trace}: {_count(len(routing.tokens), 'token')} x {_count(routing.num_layers, 'layer')}, "
        f"{_count(len(routing.sequence_ids), 'sequence')}, "
        f"{_count(routing.skipped_tokens, 'incomplete token')} skipped",
        markup=False,
        soft_wrap=True,  # whole when piped too, where rich would cut it at 80 columns; the tables fit the width
    )
    console.print(_hit_rate_table(results, policies, slot_counts, per_layer))
    if prefetch != "none":
        console.print(_prefetch_table(results))
    if plot is not None:
        console.print(f"wrote {plot}", markup=False, soft_wrap=True)


TIMELINE_HELP = (
    "Predict decode speed from measured costs: replay TRACE as `bench --route-trace` does, through the "
    "runtime's slot tables, and time each load on one copy stream and each layer and expert on one compute "
    "stream, in the runtime's order. Prints tokens/s, the bound bench holds a decode to, the share of it "
    "reached, and the speed-up over no cache (every expert loaded at every use, at the same costs), per policy "
    "and slot count. "
    "The default costs are the H100 12 GiB run (benchmarks/results/h100_9d0bc23: synthetic Mixtral-8x7B, 2-bit "
    "experts); give your own from `moe-offload bench --json` (compute_s_per_token, h2d_bandwidth_gbps, "
    "expert_bytes). No GPU needed."
)


def timeline_command(
    trace: Path = typer.Argument(..., metavar="TRACE", help="A routing trace (.jsonl), as for simulate."),
    policy: str = typer.Option("lru", "--policy", help="Comma-separated online eviction policies."),
    slots: str = typer.Option("5", "--slots", help="Slots per layer: a number, a range (4-6), or a list (4,6)."),
    prefetch: str = typer.Option(
        "oracle",
        "--prefetch",
        metavar="oracle|none",
        help="oracle (the trace's coming layers, as bench's oracle) or none.",
    ),
    depth: int = typer.Option(None, "--depth", help="Layers the oracle loads ahead. Default: every layer but one."),
    mode: str = typer.Option(
        "inclusive", "--cache-mode", metavar="inclusive|exclusive", help="inclusive, or exclusive (each load a swap)."
    ),
    compute_ms: float = typer.Option(
        H100["compute_ms"], "--compute-ms", help="Compute per token, nothing copied (bench's)."
    ),
    expert_ms: float = typer.Option(H100["expert_ms"], "--expert-ms", help="One expert's MLP for one token."),
    bandwidth: float = typer.Option(
        H100["bandwidth_gbps"], "--bandwidth", help="Pinned host-to-device GB/s (bench's)."
    ),
    back_bandwidth: float = typer.Option(
        None, "--back-bandwidth", help="Device-to-host GB/s, for exclusive mode. Default: as --bandwidth."
    ),
    expert_bytes: int = typer.Option(
        H100["expert_bytes"], "--expert-bytes", help="One packed expert (bench's expert_bytes)."
    ),
    wake_us: float = typer.Option(
        H100["wake_us"],
        "--wake-us",
        help="From a load the host waited for to its expert running (an expert graph's launch).",
    ),
    tokens: int = typer.Option(128, "--tokens", help="Decode tokens timed, after bench's prompt and warm-up."),
    as_json: bool = typer.Option(
        False, "--json", help='Print only {"costs": {...}, "no_cache": {...}, "results": [...]} on stdout.'
    ),
) -> None:
    """`moe-offload timeline`: see TIMELINE_HELP."""
    try:
        policies = list(dict.fromkeys(name.strip() for name in policy.split(",") if name.strip()))
        if not policies:
            raise MoEOffloadError(f"--policy {policy!r} names no policy: give e.g. lru or lru,path")
        slot_counts = _parse_slots(slots)
        for name, value in (("--compute-ms", compute_ms), ("--expert-ms", expert_ms), ("--bandwidth", bandwidth),
                            ("--back-bandwidth", back_bandwidth), ("--expert-bytes", expert_bytes)):  # fmt: skip
            if value is not None and not (math.isfinite(value) and value > 0):  # nan > 0 is False too
                raise MoEOffloadError(f"{name} must be a positive finite number, got {value:g}")
        if not (math.isfinite(wake_us) and wake_us >= 0):
            raise MoEOffloadError(f"--wake-us must be a finite number, not negative, got {wake_us:g}")
        check_mode(mode)
        costs = Costs.from_rates(compute_ms=compute_ms, expert_ms=expert_ms, bandwidth_gbps=bandwidth,
                                 expert_bytes=expert_bytes, wake_us=wake_us,
                                 back_bandwidth_gbps=back_bandwidth)  # fmt: skip
        routing = read_trace(trace)
        runs = [timeline(routing, costs, policy=name, slots=count, mode=mode, prefetch=prefetch, depth=depth,
                         tokens=tokens) for name in policies for count in slot_counts]  # fmt: skip
        no_cache = timeline(routing, costs, slots=max(slot_counts), prefetch="none", tokens=tokens, no_cache=True)
    except MoEOffloadError as error:
        Console(stderr=True, soft_wrap=True).print(f"error: {error}", markup=False, highlight=False)
        raise typer.Exit(2) from None

    if as_json:
        results = [run.to_dict() for run in runs]
        typer.echo(json.dumps({"costs": asdict(costs), "no_cache": no_cache.to_dict(), "results": results}))
        return
    console = Console()
    console.print(
        f"{trace}: {tokens} decode tokens of its longest sequence; an expert copies in "
        f"{costs.copy_s * 1e3:.3f} ms, computes in {expert_ms:g} ms; {compute_ms:g} ms of compute per token",
        markup=False,
        soft_wrap=True,  # as simulate's header
    )
    console.print(_timeline_table(runs, no_cache))


def _timeline_table(runs: list[TimedRun], no_cache: TimedRun) -> Table:
    first = runs[0]
    prefetch = first.prefetch if first.depth is None else f"{first.prefetch}, depth {first.depth}"
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title=f"predicted decode ({first.mode}, prefetch {prefetch})")
    for column in ("policy", "slots", "tok/s", "bound", "of bound", "× no cache", "hit rate", "stall s", "link busy"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for run in runs:
        table.add_row(run.policy, str(run.slots), f"{run.tokens_per_s:.2f}", f"{1 / run.bound_s:.2f}",
                      f"{run.fraction_of_bound:.3f}", f"{run.tokens_per_s / no_cache.tokens_per_s:.2f}",
                      f"{run.stats.hit_rate:.4f}", f"{run.stall_s:.2f}",
                      f"{run.h2d_busy_s / run.decode_s:.2f}")  # fmt: skip
    table.caption = f"no cache: {no_cache.tokens_per_s:.2f} tok/s (bound {1 / no_cache.bound_s:.2f})"
    return table


def _parse_policies(text: str | None) -> list[str]:
    if text is None:
        return [*ONLINE_POLICIES, *(n for n, cls in POLICIES.items() if cls.offline)]
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))  # repeats dropped
    unknown = [name for name in names if name not in POLICIES]
    choose = f"choose from {', '.join(POLICIES)}"
    if not names:
        raise MoEOffloadError(f"--policy {text!r} names no policy; {choose}")
    if unknown:
        which = f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} unknown"
        raise MoEOffloadError(f"--policy {text!r}: {which}; {choose}")
    return names


def _parse_slots(text: str) -> list[int]:
    bounds: list[tuple[int, int]] = []
    try:
        for part in text.split(","):
            low, dash, high = part.strip().partition("-")
            if dash and not high.strip():
                raise MoEOffloadError(f"--slots {text!r} has a range with no end: a range needs both ends, e.g. 1-8")
            bounds.append((int(low), int(high or low)))
    except ValueError:
        raise MoEOffloadError(f"--slots {text!r} is not a number, range or list: write e.g. 4, 1-8 or 2,4,6") from None
    if min(low for low, _ in bounds) < 1 or max(high for _, high in bounds) > MAX_ID:
        raise MoEOffloadError(f"--slots {text!r} must name slot counts from 1 to {MAX_ID}: write e.g. 1-8")
    counts = sorted({count for low, high in bounds for count in range(low, high + 1)})
    if not counts:
        raise MoEOffloadError(f"--slots {text!r} names no slot count: write e.g. 1-8")
    return counts


def _plot_format(path: Path) -> str:
    """The format matplotlib writes `path` in, from its suffix (none: png)."""
    from matplotlib.backend_bases import FigureCanvasBase

    # pgf is left out: matplotlib writes it only where LaTeX is installed, and fails after the replay elsewhere
    formats = sorted(name for name in FigureCanvasBase.get_supported_filetypes() if name != "pgf")
    suffix = path.suffix.lower().removeprefix(".") or "png"
    if suffix not in formats:
        raise MoEOffloadError(f"--plot {path}: matplotlib cannot write .{suffix} files; give a name ending in "
                              f"{', '.join('.' + name for name in formats)}")  # fmt: skip
    return suffix


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _hit_rate_table(results: list[SimResult], policies: list[str], slot_counts: list[int], per_layer: bool) -> Table:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title="hit rate (hits / experts asked), by slots per layer")
    table.add_column("policy", no_wrap=True)
    for count in slot_counts:
        table.add_column(str(count), justify="right", no_wrap=True)
    by_key = {(r.policy, r.slots): r for r in results}
    for name in policies:
        row = [by_key[(name, count)] for count in slot_counts]
        table.add_row(name, *(f"{r.hit_rate:.4f}" for r in row))
        if per_layer:
            for layer in range(len(row[0].stats.per_layer)):
                table.add_row(f"  layer {layer}", *(f"{r.stats.per_layer[layer].hit_rate:.4f}" for r in row))
    return table


def _prefetch_table(results: list[SimResult]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title=f"prefetch: {results[0].prefetch}")
    for column in ("policy", "slots", "hit rate", "recall", "issued", "used", "wasted"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for result in results:
        total = result.stats.total()
        recall = "-" if total.recall is None else f"{total.recall:.4f}"
        table.add_row(
            result.policy,
            str(result.slots),
            f"{total.hit_rate:.4f}",
            recall,
            str(total.prefetches_issued),
            str(total.prefetches_used),
            str(total.prefetches_wasted),
        )
    return table


def write_plot(results: list[SimResult], path: Path, title: str, plot_format: str = "png") -> None:
    """Hit rate against slots, one line per policy, in `plot_format` (a matplotlib format name); written to a
    temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r.policy for r in results):
        points = sorted((r.slots, r.hit_rate) for r in results if r.policy == name)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axes.set_xlabel("slots per layer")
    axes.set_ylabel("hit rate")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend()
    try:
        write_atomically(path, lambda temp: figure.savefig(temp, format=plot_format, dpi=120, bbox_inches="tight"),
                         "--plot")  # fmt: skip
    finally:
        plt.close(figure)
