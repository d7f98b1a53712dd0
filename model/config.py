"""The model's own configuration: a small frozen dataclass, saved into bundle.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ModelConfig:
    embedding_dim: int = 16  # per id field; a behaviour / an ad is item ++ category = 2x this
    attention_hidden: tuple[int, ...] = (80, 40)  # local activation unit, then 1 output
    mlp_hidden: tuple[int, ...] = (200, 80)  # the CTR MLP, then 1 output
    attention_softmax: bool = False  # the paper: no softmax; True normalises over real slots

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        for name in ("attention_hidden", "mlp_hidden"):
            if any(h < 1 for h in getattr(self, name)):
                raise ValueError(f"{name} sizes must be >= 1, got {getattr(self, name)}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["attention_hidden"] = list(self.attention_hidden)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        return cls(
            embedding_dim=int(d["embedding_dim"]),
            attention_hidden=tuple(int(h) for h in d["attention_hidden"]),
            mlp_hidden=tuple(int(h) for h in d["mlp_hidden"]),
            attention_softmax=bool(d["attention_softmax"]),
        )
