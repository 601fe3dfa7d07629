"""Model and neuron configuration.

`ModelConfig` describes the architecture of a spiking BERT student (DESIGN section 1) and carries
named presets; `NeuronParams` is the frozen neuron semantics every backend receives.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The six neuron sublayers of an encoder block, in execution order (DESIGN section 1). Timestep
# lists use this order; t_Q is t_A because Q has no neurons and is consumed by the attention.
SUBLAYERS: tuple[str, ...] = ("K", "V", "A", "O1", "F", "O2")


@dataclass(frozen=True)
class NeuronParams:
    """Integrate-and-fire semantics shared by every backend.

    H[t] = leak * V[t-1] + I[t];  S[t] = H[t] >= v_th (or > when fire_on_ge is False);
    V[t] = H[t] - v_th * S[t]  (soft reset).  leak = 1 is IF, leak < 1 is LIF.
    """

    v_th: float = 1.0
    leak: float = 1.0
    fire_on_ge: bool = True

    def __post_init__(self):
        if not self.v_th > 0:
            raise ValueError(f"v_th must be positive, got {self.v_th}")
        if not 0.0 < self.leak <= 1.0:
            raise ValueError(f"leak must be in (0, 1], got {self.leak}")


@dataclass
class ModelConfig:
    """Architecture of a spiking BERT student plus its default timing.

    `t_conv` is the converged timestep count used by `unrolled` mode and as the reference for
    ACs % and latency; `binary` selects 1-bit projections (the full-precision spiking student
    has `binary=False`); `weight_scale` is "row" (one alpha per output row) or "tensor".
    """

    num_layers: int = 4
    hidden_size: int = 384
    num_heads: int = 12
    intermediate_size: int = 1536
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    binary: bool = True
    weight_scale: str = "row"
    t_conv: int = 85
    neuron: NeuronParams = field(default_factory=NeuronParams)

    def __post_init__(self):
        if isinstance(self.neuron, dict):
            self.neuron = NeuronParams(**self.neuron)
        problems = []
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "type_vocab_size",
            "num_labels",
            "t_conv",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not problems and self.hidden_size % self.num_heads:
            problems.append(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.weight_scale not in ("row", "tensor"):
            problems.append(f"weight_scale must be 'row' or 'tensor', got {self.weight_scale!r}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_sublayers(self) -> int:
        """Neuron sublayers in the whole network: the embedding neurons plus six per block."""
        return 1 + len(SUBLAYERS) * self.num_layers

    @classmethod
    def from_name(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # For tests: small enough that a full forward at T=8 takes milliseconds.
    "tiny": ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
        t_conv=8,
    ),
    # The default student: MiniLM-L6 teacher, 4 of its 6 layers.
    "minilm-4l": ModelConfig(
        num_layers=4,
        hidden_size=384,
        num_heads=12,
        intermediate_size=1536,
        vocab_size=30522,
        t_conv=85,
    ),
    # The paper's SpikingBERT (BERT-base teacher, 4 layers).
    "spikingbert-base": ModelConfig(
        num_layers=4,
        hidden_size=768,
        num_heads=12,
        intermediate_size=3072,
        vocab_size=30522,
        t_conv=85,
    ),
}


def sublayer_names(num_layers: int) -> list[str]:
    """Every neuron sublayer in the flat order of the thresholds and timestep lists: the
    embedding neurons, then K V A O1 F O2 of each block."""
    return ["emb"] + [f"{l}.{s}" for l in range(num_layers) for s in SUBLAYERS]


def uniform_timesteps(num_layers: int, t: int) -> list[list[int]]:
    """Per-sublayer timestep lists ([num_layers][6], order K V A O1 F O2) all equal to t."""
    return [[t] * len(SUBLAYERS) for _ in range(num_layers)]


def check_timesteps(timesteps, num_layers: int) -> list[list[int]]:
    """Validate a per-sublayer timestep list and return it as plain ints."""
    if len(timesteps) != num_layers or any(len(row) != len(SUBLAYERS) for row in timesteps):
        raise ValueError(
            f"timesteps must be {num_layers} lists of {len(SUBLAYERS)} ints (order "
            f"{' '.join(SUBLAYERS)}), got {timesteps!r}"
        )
    out = [[int(t) for t in row] for row in timesteps]
    if any(t < 1 for row in out for t in row):
        raise ValueError(f"every timestep count must be >= 1, got {timesteps!r}")
    return out
