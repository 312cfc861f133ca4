"""The expert cache: K slots per layer on the compute device, fed from an arena of packed experts.

An expert is one contiguous uint8 buffer of `expert_bytes`; a load is one copy of it. The cache moves
bytes and keeps counts; the SlotTable of each layer decides what goes where (cache/table.py), so the
simulator, which asks the same tables, counts the same hits.

Three ways to hold the experts (DESIGN.md, "Where things live"):
- direct: no slots. The arena is where compute happens (the CPU default): every request is served
  straight from it, counted as hits, and nothing is copied.
- inclusive: the arena holds every expert; a slot holds a copy. An eviction just overwrites the slot.
- exclusive: slots and arena together hold each expert once. A miss swaps the loaded expert with the
  evicted one: the newcomer goes host to device into a spare slot buffer while the victim goes device
  to host into a spare arena row, then the spares trade places with the rows they replaced. On CUDA
  the two copies run on two streams and overlap (PCIe is full duplex): each waits only for the
  previous swap's copy of the other direction, which read the spare it writes.

On CUDA the arena is pinned (pageable, with a warning, when pinning fails), loads run on copy streams,
and each slot carries two events: `ready` (its load finished) and `free` (the compute that read it
finished), so a copy never overwrites a slot still being read and compute never reads a half-loaded one.
"""

from __future__ import annotations

import ctypes
import sys
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence

import torch

from cache.policies import LRU, Policy
from cache.stats import CacheStats
from cache.table import SlotTable, Step
from quant.errors import MoEOffloadError

MODES = ("direct", "inclusive", "exclusive")


def pinned_empty(rows: int, row_bytes: int) -> torch.Tensor:
    """[rows, row_bytes] uint8 in page-locked host memory, exactly that size.

    Not `pin_memory=True`: torch's caching host allocator rounds each block up to a power of two, so a
    17.1 GB Mixtral arena would lock 32 GiB, or fail and fall back to pageable memory."""
    return pin_in_place(torch.empty(rows, row_bytes, dtype=torch.uint8))


def pin_in_place(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (contiguous, in host memory), its pages locked and registered with CUDA; returns it.

    Registered page for page, and unregistered when the tensor is freed: keep this object, not only a
    view of it. With unified addressing (every 64-bit system) the memory is also mapped, so a kernel
    can read it in place (offload/embedding.py)."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device to pin host memory for")
    assert tensor.device.type == "cpu" and tensor.is_contiguous(), (tensor.device, tensor.stride())
    cudart = torch.cuda.cudart()
    pointer, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    code = int(cudart.cudaHostRegister(pointer, size, 0))  # 0: cudaHostRegisterDefault (mapped, with UVA)
    if code != 0:
        _clear_last_cuda_error()
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed with CUDA error {code}")
    weakref.finalize(tensor, _unregister, cudart, pointer)
    return tensor


MADV_HUGEPAGE = 14  # Linux's madvise advice: back the range with transparent huge pages
HUGE_PAGE = 1 << 21


def host_rows(rows: int, row_bytes: int) -> torch.Tensor:
    """[rows, row_bytes] uint8 in pageable host memory, in huge pages where Linux gives them (huge_pages)."""
    tensor = torch.empty(rows, row_bytes, dtype=torch.uint8)
    huge_pages(tensor)
    return tensor


def huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back `tensor`'s whole 2 MiB pages with huge pages, before anything touches them; whether it
    took the advice (False off Linux, or where the kernel has no transparent huge pages).

    Most distributions give them only where asked (/sys/kernel/mm/transparent_hugepage/enabled: madvise). On the
    CPU the experts are computed where they lie, a 17 GB arena for Mixtral-8x7B: in 4 KiB pages a decode step
    walks the page tables for every 4 KiB of each expert it reads, and a load faults each 4 KiB in. One 2-bit
    14336 x 4096 matrix times a token, 8 in turn, in one process taking turns: 0.80-0.81 ms in 4 KiB pages against
    0.75-0.79 in huge pages (benchmarks/results/huge_pages_*.json)."""
    start = -(-tensor.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(start, end - start, MADV_HUGEPAGE) == 0


def _unregister(cudart, pointer: int) -> None:
    """Unpin memory whose tensor was freed, after any copy still reading it (a wrong guess's load, say,
    which nothing waits for), on whichever GPU they run: host memory is every device's, and the current one
    need not be the arena's."""
    try:
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)
    except RuntimeError:  # at exit, with the context torn down: nothing is in flight
        pass
    cudart.cudaHostUnregister(pointer)


def _clear_last_cuda_error() -> None:
    """Reset the CUDA runtime's last error. torch's cudaHostRegister binding returns the error but leaves it
    set, so the next kernel's launch check (cudaGetLastError) would raise it from an unrelated op, and the
    callers' fallbacks would not be quiet. torch exposes no cudaGetLastError: call the loaded libcudart's
    (Linux, where torch's wheels load it as a shared library; elsewhere this does nothing)."""
    try:
        with open("/proc/self/maps") as maps:
            libraries = {line.split()[-1] for line in maps if "libcudart" in line}
    except OSError:
        return
    for library in libraries:
        ctypes.CDLL(library).cudaGetLastError()


class ExpertCache:
    """Packed experts of `num_layers` x `num_experts`, served per request through per-layer slots."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        expert_bytes: int,
        device: torch.device | str = "cpu",
        slots_per_layer: Sequence[int] | None = None,
        mode: str = "inclusive",
        policies: Sequence[Policy] | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        self.num_layers, self.num_experts, self.expert_bytes = num_layers, num_experts, expert_bytes
        self.device = torch.device(device)
        self.mode = "direct" if slots_per_layer is None else mode
        if self.mode not in MODES:
            raise MoEOffloadError(f"unknown cache mode {mode!r}; choose one of {', '.join(MODES[1:])}")
        if self.mode == "direct" and self.device.type != "cpu":
            raise MoEOffloadError("experts can be computed straight from the arena only on the CPU; set slots")
        self.stats = CacheStats.for_layers(num_layers)
        self.slots_per_layer = list(slots_per_layer) if slots_per_layer is not None else None
        if self.slots_per_layer is not None:
            self._check_slots(self.slots_per_layer)
            # one policy per layer, built as the simulator builds them (cache.policies.make_policies)
            policies = policies if policies is not None else [LRU() for _ in range(num_layers)]
            self.tables = [
                SlotTable(k, policies[layer], self.stats.per_layer[layer])
                for layer, k in enumerate(self.slots_per_layer)
            ]
        self.on_cuda = self.device.type == "cuda"
        pin = self.on_cuda if pin_memory is None else pin_memory
        self.pinned = False

        if self.mode == "direct" or self.mode == "inclusive":
            self.arena = self._host_rows(num_layers * num_experts, pin)
        if self.mode == "direct":
            return

        total_slots = sum(self.slots_per_layer)
        self.slot_base = [sum(self.slots_per_layer[:layer]) for layer in range(num_layers)]
        spare = 1 if self.mode == "exclusive" else 0
        if self.device.type == "cpu":  # the CPU computes from its slots as from an arena
            self.slot_rows = host_rows(total_slots + spare, expert_bytes)
        else:
            self.slot_rows = torch.empty(total_slots + spare, expert_bytes, dtype=torch.uint8, device=self.device)
        # slot -> row of slot_rows; fixed in inclusive mode, traded with the spare in exclusive mode
        self.slot_row = list(range(total_slots))
        self.slot_ready: list[torch.cuda.Event | None] = [None] * total_slots
        self.row_free: list[torch.cuda.Event | None] = [None] * (total_slots + spare)
        if self.on_cuda:
            self.h2d_stream = torch.cuda.Stream(self.device)
            self.d2h_stream = torch.cuda.Stream(self.device) if self.mode == "exclusive" else None
            for stream in filter(None, (self.h2d_stream, self.d2h_stream)):
                # the copy streams write the rows: freed, the allocator hands them out only after their copies
                self.slot_rows.record_stream(stream)
        if self.mode == "exclusive":
            self.gpu_spare = total_slots
            experts_in_arena = num_layers * num_experts - total_slots
            self.arena = self._host_rows(experts_in_arena + 1, pin)
            self.cpu_spare = experts_in_arena
            # where each expert not in a slot lives in the arena; filled by write()
            self.home: list[dict[int, int]] = [{} for _ in range(num_layers)]
            self._next_home = 0
            self.last_h2d: torch.cuda.Event | None = None  # the copy that last read an arena row (the spare)
            self.last_d2h: torch.cuda.Event | None = None  # the copy that last read a slot row (the spare)

    # -- set-up ------------------------------------------------------------------------------------

    def _check_slots(self, slots: list[int]) -> None:
        if len(slots) != self.num_layers:
            raise MoEOffloadError(f"slots per layer names {len(slots)} layers, the model has {self.num_layers}")
        for k in slots:
            if not 1 <= k <= self.num_experts:
                limit = f"between 1 and {self.num_experts} (the experts per layer)"
                raise MoEOffloadError(f"slots per layer must be {limit}, got {k}")

    def _host_rows(self, rows: int, pin: bool) -> torch.Tensor:
        if pin:
            try:
                self.pinned = True
                return pinned_empty(rows, self.expert_bytes)
            except RuntimeError as error:
                self.pinned = False
                warnings.warn(
                    f"could not pin {rows * self.expert_bytes} bytes ({error}); using pageable memory: each "
                    "load is then a synchronous copy, slower, and prefetching overlaps nothing",
                    stacklevel=3,
                )
        return host_rows(rows, self.expert_bytes)

    def write(self, layer: int, expert: int, data: torch.Tensor) -> None:
        """Place one packed expert, at load time. In exclusive mode the first K of a layer fill its slots."""
        if data.dtype != torch.uint8 or data.numel() != self.expert_bytes:
            raise ValueError(f"expected {self.expert_bytes} uint8 bytes, got {data.numel()} {data.dtype}")
        self.place(layer, expert).copy_(data.reshape(-1))

    def place(self, layer: int, expert: int) -> torch.Tensor:
        """The row [expert_bytes] that holds an expert from load on, for its packed bytes to be written into once
        (what `write` does): its arena row, or in exclusive mode, for the first K of a layer, a slot."""
        if self.mode != "exclusive":
            return self.arena[layer * self.num_experts + expert]
        table = self.tables[layer]
        if table.free_slots:
            return self.slot_rows[self.slot_row[self.slot_base[layer] + table.place(expert)]]
        self.home[layer][expert], self._next_home = self._next_home, self._next_home + 1
        return self.arena[self.home[layer][expert]]

    def placed(self) -> None:
        """Every expert is placed (`place`, `write`): the copy streams start after those writes. In exclusive mode the
        first K of a layer went into slot rows on the current stream, whose kernels may still be queued (a zero fill,
        a repack into a view), and the copy streams are torch's non-blocking ones, which no other stream's work
        orders: a swap's write-back could read such a row before it is written."""
        if self.on_cuda:
            for stream in filter(None, (self.h2d_stream, self.d2h_stream)):
                stream.wait_stream(torch.cuda.current_stream(self.device))

    # -- the decode path ---------------------------------------------------------------------------

    def fetch(
        self, layer: int, experts: Sequence[int], weights: Sequence[float] | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Serve one request: decide it now and start its loads, then yield (expert, packed bytes) in
        compute order; compute each before asking for the next.

        The loads start before this returns, so a prefetch for a later layer issued next queues behind
        them on the copy stream, not ahead. A load that takes the slot of an expert of this same request
        (more experts than slots) starts only once that expert's compute is enqueued.
        """
        if self.mode == "direct":
            stats = self.stats.per_layer[layer]
            stats.requests += len(experts)
            stats.hits += len(experts)
            return ((expert, self.arena[layer * self.num_experts + expert]) for expert in experts)
        steps = self.tables[layer].request(experts, weights)
        waiting: set[Step] = set()  # loads into the slot of an expert served before them
        for step in steps:
            if not step.hit:
                if step.evicted in experts:
                    waiting.add(step)
                else:
                    self._load(layer, step)
        return self._serve(layer, steps, waiting)

    def _serve(self, layer: int, steps: list[Step], waiting: set[Step]) -> Iterator[tuple[int, torch.Tensor]]:
        for step in steps:
            if step in waiting:
                self._load(layer, step)
            slot = self.slot_base[layer] + step.slot
            self._wait_ready(layer, slot)
            row = self.slot_row[slot]
            yield step.expert, self.slot_rows[row]
            if self.on_cuda:  # the compute that read this row is enqueued: a later copy into it waits for it
                self.row_free[row] = torch.cuda.current_stream(self.device).record_event()

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Guess the experts of layer `layer`'s next request and start loading those not in a slot."""
        if self.mode == "direct":
            return
        for step in self.tables[layer].prefetch(experts):
            self._load(layer, step)

    def guess(self, layer: int) -> list[int] | None:
        """The prefetcher's pending guess for the layer's next request (for traces)."""
        if self.mode == "direct" or self.tables[layer].guess is None:
            return None
        return list(self.tables[layer].guess)

    def reset(self) -> None:
        """A new sequence: caches start empty (exclusive mode: the slots keep what they hold, cold)."""
        if self.mode == "direct":
            return
        for table in self.tables:
            table.reset(keep_residents=self.mode == "exclusive")  # there, slots can't be emptied

    def settle_prefetches(self) -> None:
        """Every layer's prefetches so far count as loaded (SlotTable.settle_prefetches); call it once the
        copies have landed."""
        if self.mode == "direct":
            return
        for table in self.tables:
            table.settle_prefetches()

    # -- copies ------------------------------------------------------------------------------------

    def _load(self, layer: int, step: Step) -> None:
        slot = self.slot_base[layer] + step.slot
        stats = self.stats.per_layer[layer]
        stats.h2d_bytes += self.expert_bytes
        if self.mode == "inclusive":
            row = self.slot_row[slot]
            source = self.arena[layer * self.num_experts + step.expert]
            self.slot_ready[slot] = self._copy(self.slot_rows[row], source, after=(self.row_free[row],))
            return
        # exclusive: newcomer arena row -> spare slot row, victim's slot row -> spare arena row, then trade.
        # Each spare was last read by the previous swap's copy of the other direction: wait for that one
        # only, so this swap's two copies overlap. (The victim's row needs no wait: the copies that wrote
        # it came before on the host-to-device stream, and the compute that reads it only reads.)
        assert step.evicted is not None, "exclusive mode keeps every slot full"
        stats.d2h_bytes += self.expert_bytes
        home = self.home[layer].pop(step.expert)
        victim_row = self.slot_row[slot]
        back = self._copy(self.arena[self.cpu_spare], self.slot_rows[victim_row], after=(self.last_h2d,), d2h=True)
        ready = self._copy(self.slot_rows[self.gpu_spare], self.arena[home],
                           after=(self.last_d2h, self.row_free[self.gpu_spare]))  # fmt: skip
        self.last_h2d, self.last_d2h = ready, back
        self.home[layer][step.evicted] = self.cpu_spare
        self.cpu_spare = home
        self.slot_row[slot], self.gpu_spare = self.gpu_spare, victim_row
        self.slot_ready[slot] = ready

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, after: Sequence, d2h: bool = False):
        """Copy `src` into `dst`; on CUDA on the copy stream of its direction, once the events in `after`
        (None: nothing to wait for) have happened. Returns the copy's event (None on the CPU)."""
        if not self.on_cuda:
            dst.copy_(src)
            return None
        stream = self.d2h_stream if d2h else self.h2d_stream
        for event in after:
            self._wait_free(stream, event)
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=self.pinned)
            return stream.record_event()

    @staticmethod
    def _wait_free(stream: torch.cuda.Stream, event: torch.cuda.Event | None) -> None:
        if event is not None:
            stream.wait_event(event)

    def _wait_ready(self, layer: int, slot: int) -> None:
        event = self.slot_ready[slot]
        if event is None:
            return
        if not event.query():
            # may synchronize the host: the compute needs this load now; the wait is the stall we report
            start = time.perf_counter()
            event.synchronize()
            self.stats.per_layer[layer].stall_s += time.perf_counter() - start
        torch.cuda.current_stream(self.device).wait_event(event)
        self.slot_ready[slot] = None
