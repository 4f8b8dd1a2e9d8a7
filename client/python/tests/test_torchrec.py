"""hetkv's collections under TorchRec's own classes (torchrec 1.9.2 with fbgemm-gpu's CPU build,
which ``scripts/test.sh`` installs): given TorchRec's ``KeyedJaggedTensor``,
``hetkv.torch.EmbeddingBagCollection`` pools exactly as given hetkv's own, and as TorchRec's
``EmbeddingBagCollection`` holding the same rows does (sum and mean pooling, per-id weights,
empty bags); ``EmbeddingCollection`` returns the rows and lengths TorchRec's returns; and
``TrainPipeline`` trains on TorchRec's ``Batch`` as on a batch class of the user's, bit for bit
at bounds 0. Where TorchRec is not installed the module is skipped, unless
``HETKV_REQUIRE_TORCHREC`` is set (as ``scripts/test.sh`` sets it): then it fails."""

import os

import numpy as np
import pytest
import torch
from torch import nn

if os.environ.get("HETKV_REQUIRE_TORCHREC"):
    import torchrec  # noqa: F401  (a missing TorchRec fails the run that asked for it)
else:
    pytest.importorskip("torchrec")
from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.modules.embedding_configs import EmbeddingBagConfig as TorchRecBagConfig
from torchrec.modules.embedding_configs import EmbeddingConfig as TorchRecConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection as TorchRecBagCollection
from torchrec.modules.embedding_modules import EmbeddingCollection as TorchRecCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor as TorchRecKJT

import hetkv
import hetkv.torch
from hetkv.torch import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
    TrainPipeline,
)
from test_pipeline import Batch as UserBatch  # a batch class of the user's, shaped as TorchRec's

FEATURES = [("user", 50, 4, "sum"), ("item", 30, 6, "mean")]  # feature = table, rows, dim, pooling


def jagged(rng: np.random.Generator, bags: int, weighted: bool):
    """Keys, values, lengths and weights of a batch over FEATURES: 0 to 3 ids a bag."""
    lengths = [rng.integers(0, 4, size=bags) for _ in FEATURES]
    values = np.concatenate([
        rng.integers(0, rows, size=int(n.sum())) for n, (_, rows, _, _) in zip(lengths, FEATURES)
    ])
    weights = torch.from_numpy(rng.random(len(values)).astype(np.float32)) if weighted else None
    keys = [name for name, _, _, _ in FEATURES]
    return keys, torch.from_numpy(values), torch.from_numpy(np.concatenate(lengths)), weights


def create(cluster, suffix: str = "", dims=None):
    return {
        name: cluster.create_table(
            name + suffix, rows=rows, dim=(dims or {}).get(name, dim),
            optimizer=hetkv.Optimizer.adagrad(lr=0.1),
            init=hetkv.Initializer.normal(std=0.1, seed=i + 1),
        )
        for i, (name, rows, dim, _) in enumerate(FEATURES)
    }


def all_rows(table, rows: int) -> torch.Tensor:
    return torch.from_numpy(table.pull(np.arange(rows, dtype=np.uint64)))


@pytest.mark.parametrize("weighted", [False, True])
def test_a_bag_collection_pools_torchrec_input_as_torchrec_s_own_collection(weighted):
    rng = np.random.default_rng(7)
    poolings = {name: "sum" if weighted else pooling for name, _, _, pooling in FEATURES}
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        tables = create(cluster)
        ours = EmbeddingBagCollection(
            [EmbeddingBagConfig(tables[n].cached(), [n], poolings[n]) for n, _, _, _ in FEATURES],
            is_weighted=weighted,
        )
        theirs = TorchRecBagCollection(
            tables=[
                TorchRecBagConfig(
                    name=n, embedding_dim=dim, num_embeddings=rows, feature_names=[n],
                    pooling=PoolingType.SUM if poolings[n] == "sum" else PoolingType.MEAN,
                )
                for n, rows, dim, _ in FEATURES
            ],
            is_weighted=weighted,
        )
        with torch.no_grad():
            for n, rows, _, _ in FEATURES:
                theirs.embedding_bags[n].weight.copy_(all_rows(tables[n], rows))
            for _ in range(5):
                keys, values, lengths, weights = jagged(rng, 8, weighted)
                torchrec_input = TorchRecKJT.from_lengths_sync(keys, values, lengths, weights=weights)
                own_input = KeyedJaggedTensor.from_lengths_sync(keys, values, lengths, weights=weights)
                got = ours(torchrec_input)
                assert torch.equal(got.values(), ours(own_input).values())
                want = theirs(torchrec_input)
                assert got.keys() == want.keys() and got.length_per_key() == want.length_per_key()
                for n in keys:
                    assert torch.allclose(got.to_dict()[n], want.to_dict()[n], atol=1e-6), n


def test_an_embedding_collection_returns_what_torchrec_s_returns():
    rng = np.random.default_rng(8)
    dims = {"user": 4, "item": 4}  # TorchRec's EmbeddingCollection takes one dim for all tables
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        tables = create(cluster, dims=dims)
        ours = EmbeddingCollection([EmbeddingConfig(tables[n].cached(), [n]) for n, _, _, _ in FEATURES])
        theirs = TorchRecCollection(tables=[
            TorchRecConfig(name=n, embedding_dim=dims[n], num_embeddings=rows, feature_names=[n])
            for n, rows, _, _ in FEATURES
        ])
        with torch.no_grad():
            for n, rows, _, _ in FEATURES:
                theirs.embeddings[n].weight.copy_(all_rows(tables[n], rows))
            for _ in range(5):
                keys, values, lengths, _ = jagged(rng, 8, False)
                torchrec_input = TorchRecKJT.from_lengths_sync(keys, values, lengths)
                got, want = ours(torchrec_input), theirs(torchrec_input)
                assert sorted(got) == sorted(want)
                for n in keys:
                    assert torch.equal(got[n].lengths(), want[n].lengths()), n
                    assert torch.equal(got[n].values(), want[n].values()), n


class Model(nn.Module):
    def __init__(self, ebc: EmbeddingBagCollection):
        super().__init__()
        self.ebc = ebc
        self.bottom = nn.Linear(3, 4)
        self.top = nn.Linear(4 + sum(dim for _, _, dim, _ in FEATURES), 1)

    def forward(self, batch):
        pooled = self.ebc(batch.sparse_features).values()
        logits = self.top(torch.cat([self.bottom(batch.dense_features), pooled], dim=1)).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels), logits.detach()


def test_a_pipeline_trains_on_torchrec_s_batch_as_on_the_user_s_own():
    rng = np.random.default_rng(9)
    torch.manual_seed(4)
    data = []
    for _ in range(15):
        keys, values, lengths, _ = jagged(rng, 8, False)
        dense = torch.from_numpy(rng.random((8, 3)).astype(np.float32))
        labels = torch.from_numpy(rng.integers(0, 2, size=8).astype(np.float32))
        data.append((
            TorchRecBatch(dense, TorchRecKJT.from_lengths_sync(keys, values, lengths), labels),
            UserBatch(dense, KeyedJaggedTensor.from_lengths_sync(keys, values, lengths), labels),
        ))
    with hetkv.EmbeddedCluster(shards=2) as a, hetkv.EmbeddedCluster(shards=2) as b:
        models = []
        for cluster in (a, b):
            tables = create(cluster)
            models.append(Model(EmbeddingBagCollection([
                EmbeddingBagConfig(tables[n].cached(capacity=0.4, pull_bound=0, push_bound=0), [n], p)
                for n, _, _, p in FEATURES
            ])))
        models[1].load_state_dict(models[0].state_dict())
        pipelines = [TrainPipeline(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in models]
        its = [iter([d[0] for d in data]), iter([d[1] for d in data])]
        for i in range(len(data)):
            got, want = (p.progress(it) for p, it in zip(pipelines, its))
            assert torch.equal(got, want), f"batch {i}: outputs differ"
        for m in models:
            m.ebc.flush()
        for n, rows, _, _ in FEATURES:
            assert torch.equal(all_rows(a.table(n), rows), all_rows(b.table(n), rows)), n
