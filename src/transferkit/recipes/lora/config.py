"""`LoraConfig`, what `FineTuner.lora` did, and the format constants of adapter files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["FORMAT", "HEADER_KEY", "VERSION", "LoraConfig"]

# The adapter file's `format` and `version` header fields, and the archive member holding the
# header. Files written before the split into a package carry the same values.
FORMAT = "transferkit-lora-adapters"
VERSION = 1
HEADER_KEY = "__transferkit__"


@dataclass(frozen=True)
class LoraConfig:
    """What `FineTuner.lora` did: enough to save and reload the adapters.

    Attributes:
        rank: the LoRA rank.
        alpha: the LoRA alpha (Keras' default is the rank); the update is scaled by alpha / rank.
        targets: the paths of the layers with adapters (`base/fc1`), in model order.
        head: the names of the head layers whose weights train fully and are saved with them.
        head_spec: the head's description (`HeadSpec.to_dict()`), or None for an untouched output.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    head: tuple[str, ...] = ()
    head_spec: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dictionary."""
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "head": list(self.head),
            "head_spec": self.head_spec,
        }
