"""Pins each private TorchRec member ``torchrec_qr.distributed.torchrec_internals`` reads or writes, and that
the sharded module's lookups can be created again (TorchRec's ``update_shards`` does).

A TorchRec upgrade that renames or reshapes one of them fails here, by name.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
import torchrec.distributed.embeddingbag as torchrec_embeddingbag
import torchrec.distributed.planner.shard_estimators as torchrec_estimators
from dist_harness import run_ranks
from sharding_cases import TABLE_SETS, batch, reference, shard
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_qr import CompositionalEmbeddingBagCollection
from torchrec_qr.distributed import CompositionalEmbeddingBagCollectionSharder
from torchrec_qr.distributed import torchrec_internals as internals
from torchrec_qr.distributed.compositional_embeddingbag import ShardedCompositionalEmbeddingBagCollection
from torchrec_qr.distributed.compositional_lookup import CompositionalLookup

PLAN = {
    "t_tw": table_wise(rank=0),
    "t_cw": column_wise(ranks=[0, 1]),
    "t_rw": row_wise(),
    "t_twrw": table_row_wise(host_index=0),
    "t_dp": data_parallel(),
}


def test_overridden_hooks_are_called_by_the_constructor_and_update_shards() -> None:
    init = inspect.getsource(ShardedEmbeddingBagCollection.__init__)
    for hook in internals.OVERRIDDEN_HOOKS:
        assert callable(getattr(ShardedEmbeddingBagCollection, hook)), hook
        assert f"self.{hook}(" in init, f"ShardedEmbeddingBagCollection.__init__ no longer calls {hook}"
    assert "self._create_lookups()" in inspect.getsource(ShardedEmbeddingBagCollection.update_shards)


def test_in_backward_optimizer_attributes_are_what_torch_sets_and_torchrec_reads() -> None:
    source = torch.nn.Parameter(torch.zeros(2, 4))
    apply_optimizer_in_backward(torch.optim.SGD, [source], {"lr": 0.5})
    assert all(hasattr(source, a) for a in internals.IN_BACKWARD_ATTRIBUTES)
    copied, marked = torch.nn.Parameter(torch.zeros(2, 4)), torch.nn.Parameter(torch.zeros(2, 4))
    internals.copy_in_backward_optimizer([torch.nn.Parameter(torch.zeros(1)), source], [copied])
    assert copied._optimizer_classes == [torch.optim.SGD] and copied._optimizer_kwargs == [{"lr": 0.5}]
    internals.copy_in_backward_optimizer([], [marked])  # no source: nothing set
    assert not hasattr(marked, internals.IN_BACKWARD_ATTRIBUTES[0])
    internals.set_in_backward_optimizer([marked], torch.optim.Adagrad, {})
    assert marked._optimizer_classes == [torch.optim.Adagrad] and marked._optimizer_kwargs == [{}]
    for torchrec_module in (torchrec_embeddingbag, torchrec_estimators):
        assert '"_optimizer_classes"' in inspect.getsource(torchrec_module), torchrec_module.__name__


def _plain_ebc(rank: int, world_size: int) -> dict:
    tables = [EmbeddingBagConfig(name=n, num_embeddings=10, embedding_dim=8, feature_names=[f"f_{n}"]) for n in PLAN]
    sharder = EmbeddingBagCollectionSharder()
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    plan = construct_module_sharding_plan(
        ebc, per_param_sharding=PLAN, sharder=sharder, local_size=world_size, world_size=world_size, device_type="cpu"
    )
    module = sharder.shard(ebc, plan, ShardingEnv.from_process_group(dist.group.WORLD), torch.device("cpu"))
    types = [t for t, _ in internals.shardings(module)]
    local = {
        t: [table.name for group in internals.local_grouped_configs(s, rank) for table in group.embedding_tables]
        for t, s in internals.shardings(module)
    }
    grouped_types = {type(g) for _, s in internals.shardings(module) for g in internals.local_grouped_configs(s, rank)}
    lookups = internals.lookups_by_sharding_type(module)
    tbes = {t: internals.split_tbes(lookup) for t, lookup in lookups.items()}
    tbe_tables = {
        t: None if ks is None else sum(len(k.split_embedding_weights()) for k in ks) for t, ks in tbes.items()
    }
    count = len(lookups)
    internals.add_lookup(module, torch.nn.Identity())
    added = len(internals.lookups_by_sharding_type(module)) == count and len(list(module._lookups)) == count + 1
    before = module._has_uninitialized_input_dist
    internals.skip_input_dist(module)
    optimizer = CombinedOptimizer([])
    internals.set_fused_optimizer(module, optimizer)
    return {
        "types": types,
        "local": local,
        "grouped_types": grouped_types,
        "lookup_types": list(lookups),
        "added": added,
        "input_dist": (before, module._has_uninitialized_input_dist),
        "optimizer": module.fused_optimizer is optimizer,
        "tbe_tables": tbe_tables,
    }


def test_accessors_on_a_plain_sharded_ebc() -> None:
    for rank, r in enumerate(run_ranks(_plain_ebc, 2)):
        assert sorted(r["types"]) == ["column_wise", "data_parallel", "row_wise", "table_row_wise", "table_wise"]
        assert r["lookup_types"] == r["types"]
        assert r["grouped_types"] == {GroupedEmbeddingConfig}
        assert r["local"]["row_wise"] == ["t_rw"] and r["local"]["data_parallel"] == ["t_dp"]
        assert r["local"]["column_wise"] == ["t_cw"]  # one column shard per rank
        assert r["local"]["table_wise"] == (["t_tw"] if rank == 0 else [])
        assert r["added"] and r["input_dist"] == (True, False) and r["optimizer"]
        # Pooled lookups hand over their TBEs (one table each per local config table); data-parallel's is DDP.
        assert r["tbe_tables"] == {t: None if t == "data_parallel" else len(r["local"][t]) for t in r["types"]}


def _recreated_lookups_match(rank: int, world_size: int) -> list[float]:
    errors = []
    for table_set, sharding in (("default", "mixed"), ("default", "twrw"), ("any_partition", "rw")):
        ref = reference(weighted=False, table_set=table_set)
        module = CompositionalEmbeddingBagCollection(TABLE_SETS[table_set](), device="meta")
        dmp = shard(module, CompositionalEmbeddingBagCollectionSharder(), sharding, world_size)
        dmp.load_state_dict({"ebc." + k: v.clone() for k, v in ref.state_dict().items()})
        sharded = next(m for m in dmp.modules() if isinstance(m, ShardedCompositionalEmbeddingBagCollection))
        kjt = batch(rank, False, TABLE_SETS[table_set]())
        before = dmp(kjt).detach()
        count = len(sharded._lookups)
        sharded._softcopy_lookups()  # what update_shards does before calling _create_lookups again
        sharded._create_lookups()
        assert len(sharded._lookups) == count
        assert all(isinstance(lookup, CompositionalLookup) for lookup in sharded._lookups)
        errors.append((dmp(kjt) - before).abs().max().item())
    return errors


def test_create_lookups_again_gives_equal_outputs() -> None:
    for errors in run_ranks(_recreated_lookups_match, 2):
        assert max(errors) == 0.0, errors
