"""Path-based composition (Shi et al., KDD 2020, §4): per-class functions applied to a table row.

A path table stores one embedding sub-table, for partition 1, and for each further partition j a bank of
functions ``M_{j,c}``, one per class c. An id's embedding is its row passed through the function its
class selects in each partition, in order: ``x = M_{k,p_k(x)} ∘ … ∘ M_{2,p_2(x)} (W[p_1(x)])``.

Evaluation is batched by class: the rows of one partition are laid out as equal-length *tiles* grouped
by class (``ClassLayout``), so every layer of every class is one ``bmm`` over the tiles, never a loop
over ids or classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "PATH_KINDS", "ClassLayout", "PathFunction", "PathFunctions", "scale_grad"]

PATH_KINDS = ("linear", "mlp")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}
# Second-moment gain of a layer whose input has passed the activation (He et al. for ReLU; tanh is
# near-linear at embedding scale). Keeps each function variance-preserving at initialization.
_GAINS = {"relu": 2.0, "tanh": 1.0}


@dataclass(frozen=True)
class PathFunction:
    """The family of per-class functions of a path table.

    Args:
        kind: ``"linear"``: one ``D x D`` matrix per class (plus a bias if ``bias``); ``"mlp"``: layers
            ``D -> hidden[0] -> ... -> D`` per class with ``activation`` between them.
        hidden: the MLP's hidden widths (empty for ``linear``).
        activation: ``"relu"`` or ``"tanh"``, applied after every MLP layer but the last.
        bias: whether each layer has a per-class bias.

    Example::

        PathFunction.mlp(hidden=(64,))  # a one-hidden-layer ReLU MLP per class
    """

    kind: str = "linear"
    hidden: tuple[int, ...] = ()
    activation: str = "relu"
    bias: bool = False

    def __post_init__(self) -> None:
        if self.kind not in PATH_KINDS:
            raise ValueError(f"path function kind must be one of {PATH_KINDS}, got {self.kind!r}")
        hidden = tuple(self.hidden)
        if any(not isinstance(h, int) or isinstance(h, bool) or h < 1 for h in hidden):
            raise ValueError(f"path function hidden sizes must be positive ints, got {list(hidden)}")
        object.__setattr__(self, "hidden", hidden)
        if self.kind == "linear" and hidden:
            raise ValueError(f"a linear path function has no hidden layers, got hidden={list(hidden)}; use kind='mlp'")
        if self.kind == "mlp" and not hidden:
            raise ValueError("an mlp path function needs hidden sizes, e.g. hidden=(64,); use kind='linear' for none")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"path function activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")

    @staticmethod
    def linear(bias: bool = False) -> "PathFunction":
        return PathFunction(kind="linear", bias=bias)

    @staticmethod
    def mlp(hidden: tuple[int, ...] | list[int], activation: str = "relu", bias: bool = True) -> "PathFunction":
        return PathFunction(kind="mlp", hidden=tuple(hidden), activation=activation, bias=bias)

    def layer_dims(self, dim: int) -> list[tuple[int, int]]:
        sizes = [dim, *self.hidden, dim]
        return list(zip(sizes[:-1], sizes[1:]))

    def num_parameters(self, dim: int) -> int:
        """Parameters of one class's function."""
        return sum(i * o + (o if self.bias else 0) for i, o in self.layer_dims(dim))

    def init_bounds(self, dim: int) -> list[float]:
        """``U(-a, a)`` bound of each layer's weights: ``a = sqrt(3 g / fan_in)``, ``g`` the gain of the
        activation the layer's input has passed (1 for the first layer), so ``E[y^2] = E[x^2]``."""
        gain = _GAINS[self.activation]
        return [
            math.sqrt(3.0 * (1.0 if i == 0 else gain) / fan_in) for i, (fan_in, _) in enumerate(self.layer_dims(dim))
        ]


@dataclass(frozen=True)
class ClassLayout:
    """Where each row of a batch sits when rows are grouped by class into ``tiles`` of ``length`` rows.

    ``length = ceil(n / C)``: padding is under ``C * length`` rows (about ``n``) and there are at most
    ``n / length + C`` (about ``2C``) tiles, each reading its class's parameters once.
    """

    positions: torch.Tensor  # [n]: each row's slot in the flat [tiles * length] buffer
    tile_class: torch.Tensor  # [tiles]: the class of each tile
    length: int

    @staticmethod
    def of(classes: torch.Tensor, num_classes: int) -> "ClassLayout":
        n = classes.numel()
        length = max(1, -(-n // num_classes))
        counts = torch.zeros(num_classes, dtype=torch.int64, device=classes.device)
        counts.index_add_(0, classes, torch.ones_like(classes))
        tiles = -(-counts // length)
        tile_start = torch.cumsum(tiles, 0) - tiles
        class_start = torch.cumsum(counts, 0) - counts
        order = torch.argsort(classes, stable=True)
        rank = torch.empty_like(classes)
        rank[order] = torch.arange(n, device=classes.device) - class_start[classes[order]]
        positions = (tile_start[classes] + rank // length) * length + rank % length
        tile_class = torch.repeat_interleave(torch.arange(num_classes, device=classes.device), tiles)
        return ClassLayout(positions, tile_class, length)


class _ClassFunctions(nn.Module):
    """One partition's bank: layer l's weights stacked by class, ``[C, fan_in, fan_out]`` (biases ``[C, fan_out]``).

    Eager calls run class-tiled ``bmm`` s (``ClassLayout``); TorchScript and ``torch.export``, which cannot
    take its data-dependent tiling, run one ``bmm`` per id over the gathered class weights (same function).
    """

    def __init__(self, path: PathFunction, dim: int, num_classes: int, device: torch.device | None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.activation = path.activation
        dims = path.layer_dims(dim)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(num_classes, i, o, device=device)) for i, o in dims)
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_classes, o, device=device)) for _, o in (dims if path.bias else [])
        )
        self._bounds = path.init_bounds(dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w, a in zip(self.weights, self._bounds):
            w.uniform_(-a, a)
        for b in self.biases:
            b.zero_()

    def forward(self, x: torch.Tensor, classes: torch.Tensor, grad_scale: float) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._per_id(x, classes)
        if torch.compiler.is_exporting():
            return self._per_id(x, classes)
        return self._tiled(x, classes, grad_scale)

    def _per_id(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        biases: List[torch.Tensor] = []
        for b in self.biases:  # parameter lists are iterated, not indexed, in TorchScript
            biases.append(b)
        layers = 0
        for w in self.weights:
            if layers > 0:
                x = torch.relu(x) if self.activation == "relu" else torch.tanh(x)
            x = torch.bmm(x.unsqueeze(1), w.index_select(0, classes)).squeeze(1)
            if len(biases) > 0:
                x = x + biases[layers].index_select(0, classes)
            layers += 1
        return x

    @torch.jit.unused
    def _tiled(self, x: torch.Tensor, classes: torch.Tensor, grad_scale: float) -> torch.Tensor:
        layout = ClassLayout.of(classes, self.num_classes)
        tiles = layout.tile_class.numel()
        h = x.new_zeros(tiles * layout.length, x.shape[1]).index_copy(0, layout.positions, x)
        h = h.view(tiles, layout.length, x.shape[1])
        last = len(self.weights) - 1
        for i, w in enumerate(self.weights):
            h = torch.bmm(h, scale_grad(w, grad_scale)[layout.tile_class])
            if len(self.biases):
                h = h + scale_grad(self.biases[i], grad_scale)[layout.tile_class].unsqueeze(1)
            if i < last:
                h = ACTIVATIONS[self.activation](h)
        return h.reshape(-1, h.shape[-1])[layout.positions]


class PathFunctions(nn.ModuleDict):
    """The function banks of one path table: child ``p{j}`` holds partition j's per-class functions.

    Args:
        path: the function family.
        dim: the embedding dimension D.
        num_classes: classes of partitions 2..k (``sizes[1:]`` of the table's partition).
        device: where the parameters live (``meta``: shapes only).

    A ``ModuleDict`` so TorchScript can iterate the banks (keys, hence state-dict keys, stay ``p{j}``).
    """

    def __init__(
        self, path: PathFunction, dim: int, num_classes: list[int], device: torch.device | str | None = None
    ) -> None:
        super().__init__(
            {
                f"p{j}": _ClassFunctions(path, dim, c, torch.device(device) if device else None)
                for j, c in enumerate(num_classes, start=1)
            }
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for bank in self.children():
            bank.reset_parameters()  # type: ignore[operator]

    def forward(self, rows: torch.Tensor, classes: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
        """``[n, D]`` composed embeddings of ``rows`` (partition 1's rows) given ``classes`` ``[k, n]``.

        ``grad_scale`` multiplies the gradient of the function parameters only (see ``scale_grad``).
        """
        j = 1
        for bank in self.values():
            rows = bank(rows, classes[j], grad_scale)
            j += 1
        return rows


class _GradScale(torch.autograd.Function):
    """Identity forward; gradient times ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` with its gradient multiplied by ``scale``: undoes TorchRec's division of model-parallel
    gradients by the world size for replicated parameters that DDP averages again."""
    return x if scale == 1 else _GradScale.apply(x, scale)
