"""ExpertCache under forced routing: exact hits, misses, bytes and prefetch counts, and the bytes served."""

import random
import sys

import pytest
import torch

import offload
from cache.expert_cache import HUGE_PAGE, ExpertCache, huge_pages
from offload.graphs import DecodeGraphs
from quant.errors import MoEOffloadError
from tests.tiny import make_tiny_mixtral

LAYERS, EXPERTS, NBYTES = 2, 6, 40


def expert_bytes(layer: int, expert: int) -> torch.Tensor:
    """A packed expert whose every byte says which expert it is."""
    return torch.full((NBYTES,), layer * EXPERTS + expert + 1, dtype=torch.uint8)


def make_cache(slots, mode="inclusive") -> ExpertCache:
    """`slots`: None (direct), one count for every layer, or one count a layer."""
    cache = ExpertCache(
        num_layers=LAYERS,
        num_experts=EXPERTS,
        expert_bytes=NBYTES,
        slots_per_layer=None if slots is None else [slots] * LAYERS if isinstance(slots, int) else list(slots),
        mode=mode,
    )
    for layer in range(LAYERS):
        for expert in range(EXPERTS):
            cache.write(layer, expert, expert_bytes(layer, expert))
    return cache


def serve(cache, layer, experts):
    """Fetch a request and check every buffer holds the expert it claims to be."""
    served = []
    for expert, buffer in cache.fetch(layer, experts):
        assert torch.equal(buffer, expert_bytes(layer, expert)), f"layer {layer} expert {expert} served wrong bytes"
        served.append(expert)
    return served


def test_inclusive_counts_hits_misses_and_bytes_exactly():
    cache = make_cache(slots=2)
    assert serve(cache, 0, [3, 1]) == [3, 1]  # two misses
    assert serve(cache, 0, [1, 4]) == [1, 4]  # 1 hits; 4 evicts 3 (LRU), never 1 of the same request
    assert serve(cache, 0, [3, 4]) == [4, 3]  # hits first: 4 hits, 3 misses and evicts 1
    layer = cache.stats.per_layer[0]
    assert (layer.requests, layer.hits, layer.misses) == (6, 2, 4)
    assert layer.h2d_bytes == 4 * NBYTES and layer.d2h_bytes == 0
    assert cache.stats.per_layer[1].requests == 0


def test_one_slot_serves_a_two_expert_request_in_turn():
    cache = make_cache(slots=1)
    assert serve(cache, 1, [2, 5]) == [2, 5]
    assert serve(cache, 1, [5, 2]) == [5, 2]  # 5 is a hit, then 2 takes its slot
    layer = cache.stats.per_layer[1]
    assert (layer.hits, layer.misses, layer.h2d_bytes) == (1, 3, 3 * NBYTES)


def test_prefetch_used_and_wasted_and_recall():
    cache = make_cache(slots=3)
    cache.prefetch(0, [0, 1])  # two loads issued
    serve(cache, 0, [1, 2])  # 1 was prefetched: a hit and a prefetch used; 2 a miss
    cache.prefetch(0, [4, 5])  # 4 fills the free slot, 5 evicts the LRU expert: 0, never used
    serve(cache, 0, [4, 3])
    layer = cache.stats.per_layer[0]
    assert (layer.prefetches_issued, layer.prefetches_used, layer.prefetches_wasted) == (4, 2, 1)
    assert (layer.hits, layer.misses) == (2, 2)
    assert (layer.guess_right, layer.guess_total) == (2, 4)
    assert layer.recall == 0.5
    assert layer.h2d_bytes == 6 * NBYTES
    cache.reset()  # 5 was prefetched and never used
    assert cache.stats.per_layer[0].prefetches_wasted == 2


@pytest.mark.parametrize("slots", [1, 2, 3, 5, 6, (4, 1), (2, 5)])
def test_exclusive_swaps_keep_every_expert_intact_and_count_like_inclusive(slots):
    per_layer = [slots] * LAYERS if isinstance(slots, int) else list(slots)
    rng = random.Random(str(slots))
    requests = [(rng.randrange(LAYERS), rng.sample(range(EXPERTS), 2)) for _ in range(300)]
    inclusive, exclusive = make_cache(slots), make_cache(slots, mode="exclusive")
    # exclusive starts with experts 0..K-1 in the slots; warm the inclusive cache the same way
    for layer in range(LAYERS):
        serve(inclusive, layer, list(range(per_layer[layer])))
    inclusive.stats.reset()
    for layer, experts in requests:
        assert serve(inclusive, layer, experts) == serve(exclusive, layer, experts)
    a, b = inclusive.stats.total(), exclusive.stats.total()
    assert (a.hits, a.misses, a.h2d_bytes) == (b.hits, b.misses, b.h2d_bytes)
    assert b.d2h_bytes == b.h2d_bytes  # every load in exclusive mode sends its victim back
    assert exclusive.arena.shape[0] == LAYERS * EXPERTS - sum(per_layer) + 1  # each expert held once, plus a spare


class LoggedCopies(ExpertCache):
    """Names each copy ("h2d 0", "d2h 0", ...) as its event, and logs what it was told to wait for."""

    def _copy(self, dst, src, after, d2h=False):
        super()._copy(dst, src, after, d2h)
        direction = "d2h" if d2h else "h2d"
        name = f"{direction} {sum(1 for logged in self.log if logged[0].startswith(direction))}"
        self.log.append((name, [event for event in after if event is not None]))
        return name

    def _wait_ready(self, layer, slot):
        self.slot_ready[slot] = None  # the copies ran already, on the CPU


def test_exclusive_swaps_wait_only_for_the_previous_swaps_other_copy():
    """A swap's two copies overlap: each waits for the copy of the other direction that last read the spare
    it writes, the previous swap's, never for its partner (which would make every swap two copies long)."""
    cache = LoggedCopies(num_layers=1, num_experts=4, expert_bytes=NBYTES, slots_per_layer=[2], mode="exclusive")
    cache.log = []
    for expert in range(4):
        cache.write(0, expert, expert_bytes(0, expert))
    for experts in ([2], [3], [0], [2]):  # each misses: one swap each
        for expert, buffer in cache.fetch(0, experts):
            assert torch.equal(buffer, expert_bytes(0, expert))
    assert cache.log == [
        ("d2h 0", []), ("h2d 0", []),
        ("d2h 1", ["h2d 0"]), ("h2d 1", ["d2h 0"]),
        ("d2h 2", ["h2d 1"]), ("h2d 2", ["d2h 1"]),
        ("d2h 3", ["h2d 2"]), ("h2d 3", ["d2h 2"]),
    ]  # fmt: skip


class FakeStream:
    """A CUDA stream's ordering calls, logged: which streams it was told to wait for."""

    def __init__(self, name: str) -> None:
        self.name, self.waited_for = name, []

    def wait_stream(self, stream) -> None:
        self.waited_for.append(stream.name)


@pytest.mark.parametrize("mode", ["inclusive", "exclusive"])
def test_the_copy_streams_start_after_the_experts_placed_at_load(tmp_path, monkeypatch, mode):
    """In exclusive mode load writes the first K experts of a layer into slot rows on the current stream; the copy
    streams (non-blocking: nothing orders them after another stream's work) wait for it before their first copy."""
    compute = FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    cache = ExpertCache(num_layers=1, num_experts=4, expert_bytes=NBYTES, slots_per_layer=[2], mode=mode)
    cache.on_cuda = True  # as on a GPU, its copy streams stand-ins
    cache.h2d_stream, cache.d2h_stream = FakeStream("h2d"), FakeStream("d2h") if mode == "exclusive" else None
    cache.placed()
    for stream in filter(None, (cache.h2d_stream, cache.d2h_stream)):
        assert stream.waited_for == ["compute"]
    places, placed = [], []  # at load: each expert's place asked for, then placed() (when, in places)
    place = ExpertCache.place
    monkeypatch.setattr(ExpertCache, "place", lambda self, *args: places.append(args) or place(self, *args))
    monkeypatch.setattr(ExpertCache, "placed", lambda self: placed.append(len(places)))
    model = offload.load(str(make_tiny_mixtral(tmp_path / "m", layers=2)), device="cpu", slots=2, cache_mode=mode)
    assert placed == [model.config.num_layers * model.config.num_experts] == [len(places)]  # once, after the last


def test_direct_mode_serves_from_the_arena_without_copies():
    cache = make_cache(slots=None)
    assert cache.mode == "direct"
    assert serve(cache, 0, [5, 0]) == [5, 0]
    total = cache.stats.total()
    assert (total.requests, total.hits, total.misses, total.h2d_bytes) == (2, 2, 0, 0)


def test_slot_counts_are_checked():
    with pytest.raises(
        MoEOffloadError, match=r"slots per layer must be between 1 and 6 \(the experts per layer\), got 7"
    ):
        ExpertCache(num_layers=1, num_experts=6, expert_bytes=8, slots_per_layer=[7])
    with pytest.raises(MoEOffloadError, match="slots per layer names 1 layers, the model has 2"):
        ExpertCache(num_layers=2, num_experts=6, expert_bytes=8, slots_per_layer=[2])


def test_a_hit_is_served_before_a_miss_of_its_request_takes_its_slot():
    cache = make_cache(slots=1)
    serve(cache, 0, [5])
    assert serve(cache, 0, [3, 5]) == [5, 3]  # 5 is computed first, then 3 is loaded over it
    layer = cache.stats.per_layer[0]
    assert (layer.hits, layer.misses, layer.h2d_bytes) == (1, 2, 2 * NBYTES)


def _logged(fn, event, events):
    def wrapper(*args, **kwargs):
        events.append(event)
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("static", [False, True])
def test_a_layers_own_loads_start_before_the_next_layers_guess(trained_model_dir, static):
    """One copy stream serves loads in the order they are issued: a guess for layer l+1 issued first
    would make layer l's misses, needed now, wait behind it."""
    model = offload.load(str(trained_model_dir), device="cpu", slots=2, prefetch="early")
    if static:
        model.decoder.graphs = DecodeGraphs(capture=False)  # the path CUDA graphs capture, run eagerly
    cache, events = model.cache, []
    load = cache._load
    cache._load = lambda layer, step: (events.append(("load", layer)), load(layer, step))
    for layer, table in enumerate(cache.tables):
        table.request = _logged(table.request, ("request", layer), events)
    tokens = torch.tensor([1, 330, 1070, 28747, 307, 28705, 13, 1270])
    model.forward(tokens[:3], 0)
    events.clear()
    for position in range(3, len(tokens)):
        model.forward(tokens[position : position + 1], position)
    starts = [i for i, (kind, _) in enumerate(events) if kind == "request"] + [len(events)]
    demand = guesses = 0
    for begin, end in zip(starts, starts[1:]):  # from one request to the next
        layer = events[begin][1]
        loads = [loaded for _, loaded in events[begin + 1 : end]]
        assert loads == sorted(loads) and set(loads) <= {layer, layer + 1}, (layer, loads)
        demand += loads.count(layer)
        guesses += loads.count(layer + 1)
    assert demand > 0 and guesses > 0  # both kinds happened


class FakeCudart:
    """Records cudaHostRegister / cudaHostUnregister calls; `fail` makes registering return error 2."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.registered, self.unregistered = fail, [], []

    def cudaHostRegister(self, pointer, size, flags):  # noqa: N802 (CUDA's name)
        self.registered.append((pointer, size, flags))
        return 2 if self.fail else 0

    def cudaHostUnregister(self, pointer):  # noqa: N802
        self.unregistered.append(pointer)
        return 0


def test_the_arena_is_pinned_at_its_exact_size(monkeypatch):
    """torch's pin_memory=True rounds up to a power of two (17.1 GB -> 32 GiB); the arena registers exactly
    its rows, and unregisters them when it is freed. A failed pin falls back to pageable memory and says so."""
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    # unpinned only after the copies still in flight (a wrong guess's, which nothing waits for), on every GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: cudart.unregistered.append(f"synchronized {device}"))
    cache = ExpertCache(num_layers=3, num_experts=5, expert_bytes=1000, pin_memory=True)
    pointer = cache.arena.data_ptr()
    assert cache.pinned and cudart.registered == [(pointer, 3 * 5 * 1000, 0)]
    del cache
    assert cudart.unregistered == ["synchronized 0", "synchronized 1", pointer]
    monkeypatch.setattr(torch.cuda, "cudart", lambda: FakeCudart(fail=True))
    with pytest.warns(UserWarning, match=r"^could not pin 15000 bytes \(cudaHostRegister of 15000 bytes failed "
                                         r"with CUDA error 2\); using pageable memory: each load is then a "
                                         r"synchronous copy"):  # fmt: skip
        cache = ExpertCache(num_layers=3, num_experts=5, expert_bytes=1000, pin_memory=True)
    assert not cache.pinned and cache.arena.shape == (15, 1000)


def vm_flags(address: int) -> list[str]:
    """The kernel's flags for the mapping that holds `address` (/proc/self/smaps)."""
    mapping = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                mapping = start <= address < end
            elif head == "VmFlags:" and mapping:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
@pytest.mark.parametrize("mode", ["direct", "inclusive", "exclusive"])
def test_the_cpus_arena_and_slots_ask_for_huge_pages(mode):
    """On the CPU the experts are computed where they lie: the arena and the slots are advised into huge pages
    (madvise's "hg" flag on their whole 2 MiB pages) before load writes them."""
    if not huge_pages(torch.empty(4 << 20, dtype=torch.uint8)):
        pytest.skip("this kernel has no transparent huge pages")
    cache = ExpertCache(num_layers=2, num_experts=4, expert_bytes=3 << 20, slots_per_layer=None if mode == "direct"
                        else [2, 2], mode=mode)  # fmt: skip
    rows = [cache.arena] + ([] if mode == "direct" else [cache.slot_rows])
    for tensor in rows:
        first_whole = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        assert "hg" in vm_flags(first_whole)
