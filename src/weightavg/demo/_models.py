"""The demo's models: a BatchNorm MLP (default) and a small 1D CNN with BatchNorm."""

from __future__ import annotations

from torch import Tensor, nn

from .._errors import bad_arg

__all__ = ["MODELS", "make_model"]

MODELS = ("mlp", "cnn")


class MLP(nn.Module):
    """``D-256-256-C`` with BatchNorm and ReLU after each hidden layer."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """Three 1D convolutions (32 channels, BatchNorm, ReLU; the last two with stride 2), then a linear head."""

    def __init__(self, in_features: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, padding=1, stride=2), nn.BatchNorm1d(channels), nn.ReLU(),
        )
        length = in_features
        for _ in range(2):
            length = (length + 1) // 2
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x[:, None, :]).flatten(1))


def make_model(kind: str, in_features: int, num_classes: int) -> nn.Module:
    """Build the model ``kind`` (``"mlp"`` or ``"cnn"``) for ``in_features`` inputs."""
    if kind == "mlp":
        return MLP(in_features, num_classes)
    if kind == "cnn":
        return CNN1d(in_features, num_classes)
    raise bad_arg("model", kind, f"one of {', '.join(MODELS)}")
