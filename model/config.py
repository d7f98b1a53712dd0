"""The model's own configuration: a small frozen dataclass, saved into bundle.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass

ACTIVATIONS = ("prelu", "dice")


@dataclass(frozen=True)
class ModelConfig:
    embedding_dim: int = 16  # per id field; a behaviour / an ad is item ++ category = 2x this
    attention_hidden: tuple[int, ...] = (80, 40)  # local activation unit, then 1 output
    mlp_hidden: tuple[int, ...] = (200, 80)  # the CTR MLP, then 1 output
    attention_softmax: bool = False  # the paper: no softmax; True normalises over real slots
    activation: str = "prelu"  # of every MLP: prelu, or dice (paper, section 5.2)
    wide_buckets: int = 1_000_003  # Wide&Deep: hashed (behaviour, candidate) cross features (a prime)

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        for name in ("attention_hidden", "mlp_hidden"):
            if any(h < 1 for h in getattr(self, name)):
                raise ValueError(f"{name} sizes must be >= 1, got {getattr(self, name)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.wide_buckets < 1:
            raise ValueError(f"wide_buckets must be >= 1, got {self.wide_buckets}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["attention_hidden"] = list(self.attention_hidden)
        d["mlp_hidden"] = list(self.mlp_hidden)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        default = cls()
        return cls(
            embedding_dim=int(d["embedding_dim"]),
            attention_hidden=tuple(int(h) for h in d["attention_hidden"]),
            mlp_hidden=tuple(int(h) for h in d["mlp_hidden"]),
            attention_softmax=bool(d["attention_softmax"]),
            activation=str(d.get("activation", default.activation)),  # bundles before Dice: PReLU
            wide_buckets=int(d.get("wide_buckets", default.wide_buckets)),
        )
