"""The compositional collection inside TorchRec's DLRM: forward, backward and a few SGD steps."""

from __future__ import annotations

import random

import torch
from conftest import make_kjt, table_grads
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRMTrain

from torchrec_qr import ChineseRemainder, CompositionalEmbeddingBagCollection, QuotientRemainder, compress

D, DENSE_IN, B = 8, 4, 64


def build_model() -> tuple[DLRMTrain, CompositionalEmbeddingBagCollection]:
    configs = [
        EmbeddingBagConfig(name="t_user", num_embeddings=1000, embedding_dim=D, feature_names=["user"]),
        EmbeddingBagConfig(name="t_item", num_embeddings=500, embedding_dim=D, feature_names=["item", "item_hist"]),
        EmbeddingBagConfig(name="t_cat", num_embeddings=20, embedding_dim=D, feature_names=["cat"]),
    ]
    tables = compress(configs, QuotientRemainder(7), threshold=100)
    tables[1] = compress([configs[1]], ChineseRemainder.balanced(500, 2), combine="add")[0]
    ebc = CompositionalEmbeddingBagCollection(tables)
    dlrm = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=DENSE_IN,
        dense_arch_layer_sizes=[16, D],
        over_arch_layer_sizes=[16, 1],
    )
    return DLRMTrain(dlrm), ebc


def make_batch(seed: int = 0) -> Batch:
    rng = random.Random(seed)
    user = [rng.randrange(1000) for _ in range(B)]
    bags = {
        "user": [[u] for u in user],
        "item": [[rng.randrange(500)] for _ in range(B)],
        "item_hist": [[rng.randrange(500) for _ in range(rng.randint(0, 3))] for _ in range(B)],
        "cat": [[rng.randrange(20)] for _ in range(B)],
    }
    dense = torch.rand(B, DENSE_IN, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([(u % 3 == 0) != (float(x) > 0.7) for u, x in zip(user, dense[:, 0])], dtype=torch.float32)
    return Batch(dense_features=dense, sparse_features=make_kjt(bags), labels=labels)


def test_dlrm_forward_backward_reaches_every_table_and_mlp():
    model, ebc = build_model()
    batch = make_batch()
    logits = model.model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (B, 1) and torch.isfinite(logits).all()
    loss, (loss_detached, logits_detached, labels) = model(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(logits_detached, logits.detach().squeeze(-1))
    loss.backward()

    grads = table_grads(ebc)
    assert set(grads) == {"t_user__p0", "t_user__p1", "t_item__p0", "t_item__p1", "t_cat"}
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name
    for part in (model.model.dense_arch, model.model.over_arch):
        for name, p in part.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dlrm_sgd_reduces_loss():
    model, ebc = build_model()
    batch = make_batch(1)
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    before = {k: v.clone() for k, v in ebc.state_dict().items()}
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    after = ebc.state_dict()
    for k, v in before.items():
        assert not torch.equal(v, after[k]), f"{k} was not updated"
    # The model still evaluates on a fresh batch of the same task.
    with torch.no_grad():
        held_out, _ = model(make_batch(2))
    assert torch.isfinite(held_out)
