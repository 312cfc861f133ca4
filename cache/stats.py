"""The counters every run keeps, per layer and in total (DESIGN.md, "Statistics that every run keeps")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerStats:
    """What one layer's expert cache saw. Every field is a plain sum, so layers add up."""

    requests: int = 0  # experts asked for: one per (request, expert)
    hits: int = 0  # asked-for experts already in a slot (a prefetch that arrived counts)
    misses: int = 0  # asked-for experts that had to be loaded on demand
    prefetches_issued: int = 0  # loads started by the prefetcher
    prefetches_used: int = 0  # prefetched experts that a later request hit
    prefetches_wasted: int = 0  # prefetched experts evicted (or reset) before any request used them
    guess_right: int = 0  # asked-for experts the prefetcher had guessed for this request
    guess_total: int = 0  # asked-for experts at requests the prefetcher made a guess for
    stall_s: float = 0.0  # time spent waiting for loads (on demand or in flight)
    h2d_bytes: int = 0  # bytes copied host to device (arena -> slot)
    d2h_bytes: int = 0  # bytes copied device to host (exclusive mode: the victim going back)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def recall(self) -> float | None:
        """Share of the asked-for experts the prefetcher had guessed; None when it never guessed."""
        return self.guess_right / self.guess_total if self.guess_total else None

    def add(self, other: LayerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def __sub__(self, before: LayerStats) -> LayerStats:
        """What was counted since `before` (a copy taken then): a timed window's own counts."""
        return LayerStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": round(self.hit_rate, 6), "recall": _round(self.recall)}


@dataclass
class CacheStats:
    """One LayerStats per layer; `total()` sums them."""

    per_layer: list[LayerStats] = field(default_factory=list)

    @classmethod
    def for_layers(cls, num_layers: int) -> CacheStats:
        return cls([LayerStats() for _ in range(num_layers)])

    def total(self) -> LayerStats:
        total = LayerStats()
        for layer in self.per_layer:
            total.add(layer)
        return total

    def reset(self) -> None:
        """Zero every counter in place: the slot tables hold these very objects."""
        for layer in self.per_layer:
            for f in fields(layer):
                setattr(layer, f.name, type(getattr(layer, f.name))())

    def to_dict(self) -> dict:
        """Totals at the top level, then `per_layer` (the shape `generate --json` prints)."""
        return {**self.total().to_dict(), "per_layer": [layer.to_dict() for layer in self.per_layer]}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
