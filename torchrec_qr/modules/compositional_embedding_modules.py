"""``CompositionalEmbeddingBagCollection``: a drop-in ``EmbeddingBagCollection`` built from sub-tables.

No ``from __future__ import annotations`` here: fx copies ``forward``'s annotations into traced code, which
TorchScript must resolve, so they stay real types.
"""

from typing import Callable, List

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_qr.modules.batched_embedding_bags import BatchedEmbeddingBags
from torchrec_qr.modules.composition import LookupComposer, _combine
from torchrec_qr.modules.embedding_configs import CompositionalEmbeddingBagConfig, physical_table_configs
from torchrec_qr.modules.fused_compose import FusedCompose
from torchrec_qr.modules.hot_id_buffers import HotIdBuffers
from torchrec_qr.modules.path_functions import PathFunctions
from torchrec_qr.modules.scripted_composition import ScriptedComposition
from torchrec_qr.modules.validation import check_features, check_id_ranges, check_tables
from torchrec_qr.modules.variable_batch import fixed_batch

__all__ = ["CompositionalEmbeddingBagCollection", "path_functions_for"]


def path_functions_for(tables: list[EmbeddingBagConfig], device: torch.device | str | None) -> nn.ModuleDict:
    """Table name -> freshly initialized ``PathFunctions`` for each ``path`` table."""
    return nn.ModuleDict(
        {
            t.name: PathFunctions(t.path, t.embedding_dim, t.sub_table_sizes()[1:], device)
            for t in tables
            if isinstance(t, CompositionalEmbeddingBagConfig) and t.path is not None
        }
    )


def _validate(features: KeyedJaggedTensor, module: "CompositionalEmbeddingBagCollection") -> KeyedJaggedTensor:
    if isinstance(features, KeyedJaggedTensor) and features.values().device.type == "meta":
        return features  # no values to read: shapes only
    check_features(features, module._feature_names, module._is_weighted)
    if module.validate_ids:
        check_id_ranges(features, module._embedding_bag_configs)
    return features


def _pooled_embeddings(features: KeyedJaggedTensor, module: "CompositionalEmbeddingBagCollection") -> torch.Tensor:
    """``[B, sum of dims]``: expand → sub-table lookups → compose (the eager training path; tracing, scripting
    and export take ``ScriptedComposition``). On ``meta`` only the shape is known."""
    if features.values().device.type == "meta":
        return torch.empty(features.stride(), sum(module._embedding_dims), device="meta")
    if features.variable_stride_per_key():
        features = fixed_batch(features)
    inputs = module._composer.inputs(features)
    if module._fused_compose is not None and module._fused_compose.serves(inputs):
        return module._fused_compose(inputs)
    (lookup_input,) = module._composer.expand(inputs, weighted=module._is_weighted)
    looked_up = module._embedding_bag_collection(lookup_input)
    return module._composer.compose(inputs, looked_up)


def _opaque_call(module: nn.Module, *args: object) -> object:
    """``module(*args)``; under fx symbolic tracing one ``call_module`` node instead of the module's body, so
    the GraphModule keeps the module as it is (and TorchScript compiles it as it is)."""
    if isinstance(args[0], torch.fx.Proxy):
        return args[0].tracer.create_proxy("call_module", args[0].tracer.path_of_module(module), args, {})
    return module(*args)


class CompositionalEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An ``EmbeddingBagCollection`` whose large tables are stored as compositional sub-tables.

    Takes plain ``EmbeddingBagConfig`` s and ``CompositionalEmbeddingBagConfig`` s in any mix; ``forward``
    maps a ``KeyedJaggedTensor`` to a ``KeyedTensor`` with the same keys, order and dims an
    ``EmbeddingBagCollection`` over the same logical configs produces. Every sub-table (and plain table) is
    looked up by FBGEMM table-batched kernels, one call per pooling type.

    Args:
        tables: logical table configs.
        is_weighted: whether inputs carry per-id weights (a bag is ``sum_i w_i x_i``).
        device: where the sub-tables live; ``meta`` builds shapes only (for sharding with DMP).
        validate_ids: check every id is in ``[0, num_embeddings)`` (one device sync per batch); turn off
            for speed once the input pipeline is trusted.
        storage: builds the physical tables' storage from their configs and the device (default
            ``BatchedEmbeddingBags``: dense FBGEMM TBE); ``FusedCompositionalEmbeddingBagCollection`` passes
            one with a fused optimizer.

    State dict: ``_embedding_bag_collection.embedding_bags.{table}.weight`` for plain tables and
    ``..{table}__p{j}.weight`` for sub-table j; ``_path_functions.{table}.p{j}.weights.{l}`` (and
    ``.biases.{l}``) for layer l of a path table's partition-j functions, ``[classes, fan_in, fan_out]``;
    ``_hot_ids.{table}`` for a ``HotIds`` table's hot-id list (see ``HotIdBuffers``).
    The sharded module uses the same keys. Path functions are dense parameters: under DMP they are
    replicated and synced by its data-parallel wrapper, so they need the dense optimizer.

    Serving: ``torch.jit.script``, ``torchrec.fx.symbolic_trace`` (then script) and ``torch.export`` take
    ``ScriptedComposition``, the same function in TorchScript-able code (no id-range checks); eager calls
    take the training path. Variable-batch inputs are eager only.

    Example::

        tables = compress(
            [EmbeddingBagConfig(name="t1", num_embeddings=1_000_000, embedding_dim=64, feature_names=["f1"])],
            partition=QuotientRemainder(collisions=100), combine="mult",
        )
        ebc = CompositionalEmbeddingBagCollection(tables)
        kt = ebc(KeyedJaggedTensor.from_lengths_sync(["f1"], torch.tensor([3, 999_999]), torch.tensor([1, 1])))
        kt["f1"].shape  # torch.Size([2, 64])
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: torch.device | str | None = None,
        validate_ids: bool = True,
        *,
        storage: Callable[[list[EmbeddingBagConfig], torch.device | str | None], nn.Module] = BatchedEmbeddingBags,
    ) -> None:
        super().__init__()
        check_tables(tables)
        self._embedding_bag_configs = list(tables)
        self._is_weighted = is_weighted
        self.validate_ids = validate_ids
        # Input features (each once) and output keys: ``feature@table`` where a feature feeds several tables,
        # as TorchRec's EmbeddingBagCollection names them.
        self._feature_names = list(dict.fromkeys(f for t in tables for f in t.feature_names))
        self._embedding_names = [name for names in get_embedding_names_by_table(tables) for name in names]
        self._embedding_dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self._embedding_bag_collection = storage(physical_table_configs(tables), device)
        self._path_functions = path_functions_for(tables, device)
        self._hot_ids = HotIdBuffers(tables, device)  # HotIds tables' lists: state dict keys _hot_ids.{table}
        self._composer = LookupComposer.for_tables(self._embedding_bag_configs, is_weighted, self._path_functions)
        assert self._composer.physical_feature_names() == self._embedding_bag_collection.feature_names()
        self._fused_compose: FusedCompose | None = None  # set by storages with a fused optimizer
        self._scripted = ScriptedComposition(
            self._composer,
            self._embedding_bag_configs,
            self._feature_names,
            self._composer.physical_feature_names(),
            is_weighted,
            device,
        )

    __jit_unused_properties__ = ["device"]

    def __prepare_scriptable__(self) -> "CompositionalEmbeddingBagCollection":
        self._scripted.check_supported()
        return self

    @property
    def device(self) -> torch.device:
        return self._embedding_bag_collection._device

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def reset_parameters(self) -> None:
        self._embedding_bag_collection.reset_parameters()
        for functions in self._path_functions.values():
            functions.reset_parameters()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if torch.jit.is_scripting():
            return self._serving_forward(features)
        if isinstance(features, torch.fx.Proxy) or torch.compiler.is_exporting():
            self._scripted.check_supported()
            return self._serving_forward(features)
        return self._training_forward(features)

    def _serving_forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """The ``ScriptedComposition`` path; storage and path functions are opaque calls under fx tracing."""
        inputs = self._scripted.inputs(features)
        values, lengths, weights, batch = inputs[0], inputs[1], inputs[2], inputs[3]
        lookup, classes = self._scripted.lookup_input(values, lengths, weights, batch)
        if torch.jit.is_scripting():
            looked_up = self._embedding_bag_collection(lookup)
        else:
            looked_up = _opaque_call(self._embedding_bag_collection, lookup)
        path_rows: List[torch.Tensor] = []
        for p in range(len(self._scripted.path_tables)):
            rows, table_classes = self._scripted.path_input(p, looked_up, values, classes)
            for name, functions in self._path_functions.items():  # module dicts are indexed by unrolling only
                if name == self._scripted.path_tables[p]:
                    if torch.jit.is_scripting():
                        path_rows.append(functions(rows, table_classes))
                    else:
                        path_rows.append(_opaque_call(functions, rows, table_classes))
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._embedding_dims,
            values=self._scripted.compose(looked_up, values, lengths, weights, batch, path_rows),
        )

    @torch.jit.unused
    def _training_forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        features = _validate(features, self)
        return KeyedTensor(
            keys=self._embedding_names,
            length_per_key=self._embedding_dims,
            values=_pooled_embeddings(features, self),
        )

    def embedding_rows(self, table_name: str, ids: torch.Tensor) -> torch.Tensor:
        """``[n, D]``: the composed embedding of each id of a logical table (differentiable)."""
        table = next((t for t in self._embedding_bag_configs if t.name == table_name), None)
        if table is None:
            raise ValueError(f"unknown table {table_name!r}; tables: {[t.name for t in self._embedding_bag_configs]}")
        ids = torch.as_tensor(ids, dtype=torch.int64, device=self.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= table.num_embeddings):
            raise ValueError(f"ids for table {table_name!r} must be in [0, {table.num_embeddings})")
        weights = self._embedding_bag_collection.table_weights()
        if not isinstance(table, CompositionalEmbeddingBagConfig):
            return weights[table.name][ids]
        assert table.partition is not None
        sub_ids = table.partition.indices(ids)
        parts = [weights[sub.name][sub_ids[j]] for j, sub in enumerate(table.sub_table_configs())]
        if table.combine == "path":
            return self._path_functions[table.name](parts[0], sub_ids)
        return _combine(table.combine, parts)
