"""``hetkv.torch``: with no cache and bounds 0, ``Embedding`` trains exactly as
``torch.nn.Embedding`` plus SGD; ``EmbeddingBag`` matches ``torch.nn.EmbeddingBag`` forward and
backward (sum, mean and max; offsets with and without the last one; per-sample weights);
``padding_idx``, ``max_norm`` and half-precision outputs behave as torch's; and the dense part
trains under DDP (gloo) beside it."""

import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hetkv
import hetkv.torch


def table_like(cluster, weight: torch.Tensor, lr: float, name: str = "t"):
    """A table holding ``weight``'s rows, with SGD at ``lr`` on the shards."""
    rows, dim = weight.shape
    table = cluster.create_table(name, rows=rows, dim=dim, optimizer=hetkv.Optimizer.sgd(lr=lr))
    table.assign(np.arange(rows, dtype=np.uint64), weight.detach().numpy().astype(np.float32))
    return table


def all_rows(table):
    return torch.from_numpy(table.pull(np.arange(table.rows, dtype=np.uint64)))


@pytest.mark.parametrize("update", ["step", "backward"])
def test_embedding_without_a_cache_trains_exactly_as_torch_embedding_with_sgd(update):
    torch.manual_seed(0)
    rows, dim, lr = 50, 8, 0.1
    reference = nn.Embedding(rows, dim)
    head_ref = nn.Linear(dim, 1)
    head = copy.deepcopy(head_ref)
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = table_like(cluster, reference.weight, lr)
        emb = hetkv.torch.Embedding(table.cached(capacity=0, pull_bound=0, push_bound=0), update=update)
        assert list(emb.parameters()) == [], "the module holds no parameter"
        opt_ref = torch.optim.SGD([*reference.parameters(), *head_ref.parameters()], lr=lr)
        dense = torch.optim.SGD(head.parameters(), lr=lr)
        emb_opt = hetkv.torch.EmbeddingOptimizer(emb) if update == "step" else None

        class Both:
            def zero_grad(self):
                dense.zero_grad()
                if emb_opt is not None:
                    emb_opt.zero_grad()

            def step(self):
                dense.step()
                if emb_opt is not None:
                    emb_opt.step()

        opt = Both()
        for step in range(40):
            x = torch.randint(0, rows, (16, 3))  # repeated keys within and across samples
            y = torch.rand(16, 1)
            loss_ref = nn.functional.mse_loss(head_ref(reference(x).sum(1)), y)
            opt_ref.zero_grad()
            loss_ref.backward()
            opt_ref.step()
            out = emb(x)
            assert out.shape == (16, 3, dim)
            loss = nn.functional.mse_loss(head(out.sum(1)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert abs(loss.item() - loss_ref.item()) < 1e-5, step
        torch.testing.assert_close(all_rows(table), reference.weight.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head.weight, head_ref.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("layout", ["offsets", "last_offset", "2d"])
def test_embedding_bag_matches_torch_forward_and_backward(mode, layout):
    torch.manual_seed(1)
    rows, dim = 30, 6
    last = layout == "last_offset"
    reference = nn.EmbeddingBag(rows, dim, mode=mode, include_last_offset=last)
    with hetkv.EmbeddedCluster(shards=3) as cluster:
        table = table_like(cluster, reference.weight, lr=1.0)
        cache = table.cached(capacity=0, pull_bound=0, push_bound=0)
        bag = hetkv.torch.EmbeddingBag(cache, mode=mode, include_last_offset=last)
        if layout in ("offsets", "last_offset"):
            x = torch.tensor([1, 2, 2, 7, 29, 0, 1, 1, 1])
            offsets = [0, 3, 5, 5] + ([9] if last else [])  # an empty bag among them
            args = (x, torch.tensor(offsets))
        else:
            x = torch.randint(0, rows, (5, 4))
            args = (x,)
        want = reference(*args)
        got = bag(*args)
        torch.testing.assert_close(got, want)
        grad_out = torch.randn_like(want)
        (want * grad_out).sum().backward()
        (got * grad_out).sum().backward()
        hetkv.torch.EmbeddingOptimizer(bag).step()
        # SGD at lr 1 on the shards: each row moved by minus its gradient.
        torch.testing.assert_close(
            all_rows(table), (reference.weight - reference.weight.grad).detach(), atol=1e-6, rtol=1e-6
        )


def test_per_sample_weights_match_torch():
    torch.manual_seed(2)
    reference = nn.EmbeddingBag(20, 3, mode="sum")
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = table_like(cluster, reference.weight, lr=1.0)
        bag = hetkv.torch.EmbeddingBag(table.cached(capacity=0, pull_bound=0, push_bound=0), mode="sum")
        x, offsets = torch.tensor([3, 4, 3, 9]), torch.tensor([0, 2])
        w = torch.tensor([0.5, 2.0, -1.0, 1.0])
        torch.testing.assert_close(bag(x, offsets, per_sample_weights=w), reference(x, offsets, per_sample_weights=w))


def test_evaluation_does_not_update_and_bad_keys_are_refused():
    with hetkv.EmbeddedCluster(shards=2, tables=[{"name": "t", "rows": 10, "dim": 2}]) as cluster:
        emb = hetkv.torch.Embedding(cluster.table("t").cached(capacity=0, pull_bound=0, push_bound=0))
        emb.eval()
        out = emb(torch.tensor([1, 2]))
        assert not out.requires_grad
        with pytest.raises(hetkv.KeyOutOfRangeError):
            emb(torch.tensor([-1]))
        with pytest.raises(hetkv.KeyOutOfRangeError):
            emb(torch.tensor([10]))
        with pytest.raises(TypeError):
            emb(torch.tensor([1.0]))
        with pytest.raises(TypeError):
            hetkv.torch.Embedding(cluster.table("t"))


def _ddp_worker(rank, world, addrs, port, steps, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same dense initialisation on every rank
    cluster = hetkv.connect(addrs)
    emb = hetkv.torch.EmbeddingBag(cluster.table("ids").cached(capacity=0.2, pull_bound=10, push_bound=10), mode="sum")
    head = nn.parallel.DistributedDataParallel(nn.Linear(4, 1))
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    emb_opt = hetkv.torch.EmbeddingOptimizer(emb)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    updates = 0
    for _ in range(steps):
        x = torch.randint(0, 200, (32, 5), generator=gen)
        loss = nn.functional.mse_loss(head(emb(x)), torch.ones(32, 1))
        opt.zero_grad()
        emb_opt.zero_grad()
        loss.backward()
        opt.step()
        emb_opt.step()
        updates += len(torch.unique(x))
    emb.flush()
    torch.save({"head": head.module.state_dict(), "updates": updates}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_the_dense_part_trains_under_ddp_beside_hetkv_embeddings(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with hetkv.EmbeddedCluster(shards=2, tables=[{"name": "ids", "rows": 200, "dim": 4}]) as cluster:
        mp.spawn(_ddp_worker, args=(2, cluster.addrs, port, 15, str(tmp_path)), nprocs=2, join=True)
        results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
        for k, v in results[0]["head"].items():
            torch.testing.assert_close(v, results[1]["head"][k], msg=f"DDP kept {k} in sync")
        versions = np.zeros(200, dtype=np.uint64)
        cluster.table("ids").pull(np.arange(200, dtype=np.uint64), versions=versions)
        assert versions.sum() == sum(r["updates"] for r in results), "every worker's update applied once"


@pytest.mark.parametrize("module", ["embedding", "bag"])
def test_padding_idx_reads_zeros_is_left_out_of_bags_and_never_updated(module):
    torch.manual_seed(3)
    rows, dim, pad = 12, 4, 5
    if module == "embedding":
        reference = nn.Embedding(rows, dim, padding_idx=pad)
    else:
        reference = nn.EmbeddingBag(rows, dim, mode="mean", padding_idx=pad)
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = table_like(cluster, reference.weight, lr=1.0)
        # The shards' row of the padding key is not zeros: it is never read, nor written.
        table.assign(np.array([pad], dtype=np.uint64), np.full((1, dim), 7.0, dtype=np.float32))
        cache = table.cached(capacity=0, pull_bound=0, push_bound=0)
        if module == "embedding":
            mod = hetkv.torch.Embedding(cache, padding_idx=pad)
        else:
            mod = hetkv.torch.EmbeddingBag(cache, mode="mean", padding_idx=pad)
        assert f"padding_idx={pad}" in repr(mod)
        x = torch.tensor([[1, 5, 2], [5, 5, 5], [3, 5, 1]])  # a bag of padding only among them
        want, got = reference(x), mod(x)
        torch.testing.assert_close(got, want)
        g = torch.randn_like(want)
        (want * g).sum().backward()
        (got * g).sum().backward()
        hetkv.torch.EmbeddingOptimizer(mod).step()
        expect = (reference.weight - reference.weight.grad).detach()
        expect[pad] = 7.0
        torch.testing.assert_close(all_rows(table), expect, atol=1e-6, rtol=1e-6)
        # Not even a zero update reached it: its version is the assignments' (two).
        versions = np.zeros(1, dtype=np.uint64)
        table.pull(np.array([pad], dtype=np.uint64), versions=versions)
        assert versions[0] == 2
        # A batch of padding alone looks nothing up.
        assert mod(torch.tensor([[5, 5]])).abs().sum().item() == 0


def test_max_norm_scales_the_rows_returned_and_takes_torch_s_gradient():
    torch.manual_seed(4)
    rows, dim = 10, 4
    reference = nn.Embedding(rows, dim, max_norm=1.0)
    with torch.no_grad():
        reference.weight.mul_(3.0)  # most rows above the norm
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = table_like(cluster, reference.weight, lr=1.0)
        before = all_rows(table)
        emb = hetkv.torch.Embedding(table.cached(capacity=0, pull_bound=0, push_bound=0), max_norm=1.0)
        x = torch.tensor([[0, 1, 2], [2, 3, 9]])
        want = reference(x)  # renormalizes reference.weight's rows 0, 1, 2, 3 and 9 in place
        got = emb(x)
        torch.testing.assert_close(got, want)
        assert torch.linalg.vector_norm(got, dim=-1).max().item() <= 1.0 + 1e-5
        g = torch.randn_like(want)
        (want * g).sum().backward()
        (got * g).sum().backward()
        hetkv.torch.EmbeddingOptimizer(emb).step()
        # The shards' rows moved by torch's gradient (SGD at lr 1) from the rows as stored: the
        # lookup scaled what it returned, not the table.
        torch.testing.assert_close(all_rows(table), before - reference.weight.grad, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError):
        hetkv.torch.Embedding(table.cached(capacity=0), max_norm=0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_modules_return_their_dtype_and_push_f32_gradients(dtype):
    torch.manual_seed(5)
    reference = nn.EmbeddingBag(8, 4, mode="sum")
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = table_like(cluster, reference.weight, lr=1.0)
        bag = hetkv.torch.EmbeddingBag(table.cached(capacity=0, pull_bound=0, push_bound=0), mode="sum")
        bag = bag.half() if dtype == torch.float16 else bag.bfloat16()
        assert list(bag.state_dict()) == ["weight"], "the rows are state, the dtype is not"
        assert "dtype" in repr(bag)
        x = torch.tensor([[1, 2], [3, 3]])
        got = bag(x)
        assert got.dtype == dtype
        torch.testing.assert_close(got, reference(x).to(dtype))
        got.float().sum().backward()
        hetkv.torch.EmbeddingOptimizer(bag).step()
        # d(sum)/d(row) is the row's count in the batch: rows 1 and 2 once, row 3 twice.
        expect = reference.weight.detach().clone()
        expect[[1, 2]] -= 1.0
        expect[3] -= 2.0
        torch.testing.assert_close(all_rows(table), expect, atol=1e-6, rtol=1e-6)
        assert bag.float()(x).dtype == torch.float32


def test_modules_over_caches_are_not_pickled_or_copied_and_the_error_says_why(tmp_path):
    import pickle

    with hetkv.EmbeddedCluster(shards=1, tables=[{"name": "t", "rows": 10, "dim": 2}]) as cluster:
        table = cluster.table("t")
        emb = hetkv.torch.Embedding(table.cached(capacity=0.5))
        attempts = {
            "deepcopy": lambda: copy.deepcopy(emb),
            "torch.save": lambda: torch.save(emb, tmp_path / "m.pt"),
            "pickle table": lambda: pickle.dumps(table),
            "pickle cluster": lambda: pickle.dumps(cluster),
        }
        for what, attempt in attempts.items():
            with pytest.raises(TypeError, match=r"cluster\.checkpoint\(name\)"):
                attempt()
        # A model saves as usual through its state dict: the table's rows, as nn.Embedding's.
        state = emb.state_dict()
        assert list(state) == ["weight"] and state["weight"].shape == (10, 2)


def test_an_embedded_cluster_refuses_to_run_in_one_of_several_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(hetkv.Error, match=r"WORLD_SIZE=4.*hetkv\.connect"):
        hetkv.EmbeddedCluster(shards=1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    hetkv.EmbeddedCluster(shards=1).close()


def test_micro_batches_and_a_grad_scaler_step_as_torch_embedding_does():
    """Four micro-batches of a quarter of the loss each, then one step: one SGD step of the
    summed gradient (one update a key on the shards), as ``torch.nn.Embedding`` takes it; a
    ``GradScaler``'s scaled loss gives the same rows, and a step whose gradients are not finite is
    skipped for the embeddings as for the dense part."""
    torch.manual_seed(6)
    rows, dim, lr = 40, 4, 0.5
    reference = nn.Embedding(rows, dim)
    initial = reference.weight.detach().clone()
    micro = [torch.randint(0, rows, (8, 3)) for _ in range(4)]
    targets = [torch.rand(8, 1) for _ in range(4)]
    opt_ref = torch.optim.SGD(reference.parameters(), lr=lr)
    for x, y in zip(micro, targets):
        (nn.functional.mse_loss(reference(x).sum((1, 2)).unsqueeze(1), y) / 4).backward()
    opt_ref.step()
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        for scaled in (False, True):
            table = table_like(cluster, initial, lr, name=f"t{int(scaled)}")
            emb = hetkv.torch.Embedding(table.cached(capacity=0.5, pull_bound=0, push_bound=0))
            opt = hetkv.torch.EmbeddingOptimizer(emb)
            scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, enabled=scaled)
            versions = np.zeros(rows, dtype=np.uint64)
            table.pull(np.arange(rows, dtype=np.uint64), versions=versions)
            for x, y in zip(micro, targets):
                loss = nn.functional.mse_loss(emb(x).sum((1, 2)).unsqueeze(1), y) / 4
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            emb.flush()
            torch.testing.assert_close(all_rows(table), reference.weight.detach(), atol=1e-5, rtol=1e-5)
            after = np.zeros(rows, dtype=np.uint64)
            table.pull(np.arange(rows, dtype=np.uint64), versions=after)
            touched = np.unique(torch.cat(micro).numpy())
            assert (after - versions)[touched].tolist() == [1] * len(touched), "one update a key"
            if scaled:
                # Not finite: the scaler skips the step, the rows stay as they are.
                emb(micro[0]).sum().backward()
                emb.grad_carrier.grad = emb.grad_carrier.grad * float("inf")
                scaler.step(opt)
                scaler.update()
                opt.zero_grad()
                emb.flush()
                torch.testing.assert_close(all_rows(table), reference.weight.detach(), atol=1e-5, rtol=1e-5)
                assert scaler.get_scale() < 65536.0
    with pytest.raises(ValueError, match="update"):
        hetkv.torch.EmbeddingOptimizer(
            [hetkv.torch.Embedding(table.cached(capacity=0), update="backward")]
        )


def test_a_module_prefetches_the_next_batch_and_warns_once_when_a_prefetch_goes_unused():
    import warnings

    with hetkv.EmbeddedCluster(shards=2, tables=[{"name": "t", "rows": 100, "dim": 3}]) as cluster:
        cache = cluster.table("t").cached(capacity=0.5, pull_bound=0, push_bound=0)
        bag = hetkv.torch.EmbeddingBag(cache, mode="sum", padding_idx=0)
        opt = hetkv.torch.EmbeddingOptimizer(bag)
        # As a DataLoader yields them: unsorted, repeated, with padding.
        x1 = torch.tensor([[3, 1, 3, 0], [7, 0, 1, 2]])
        x2 = torch.tensor([[9, 8, 0, 8], [2, 2, 5, 6]])
        bag(x1).sum().backward()
        bag.prefetch(x2)  # the next batch's lookup, while this one steps
        opt.step()
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = bag(x2)
        stats = cache.stats()
        assert (stats["prefetched"], stats["prefetches_unused"]) == (1, 0), stats
        # Its rows hold the step taken while it was in flight (key 2 among them).
        bag.eval()
        torch.testing.assert_close(got.detach(), bag(x2))
        bag.train()
        bag.prefetch(x1)
        with pytest.warns(RuntimeWarning, match="went unused"):
            bag(x2)
        bag.prefetch(x1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            bag(x2)  # counted, not warned again
        assert cache.stats()["prefetches_unused"] == 2


def test_embedding_gradients_are_clipped_with_clip_grad_norm_as_torch_clips_them():
    torch.manual_seed(8)
    reference = nn.Embedding(12, 3)
    with hetkv.EmbeddedCluster(shards=2) as cluster:
        table = table_like(cluster, reference.weight, lr=0.5)
        emb = hetkv.torch.Embedding(table.cached(capacity=0.5, pull_bound=0, push_bound=0))
        opt = hetkv.torch.EmbeddingOptimizer(emb)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        x = torch.tensor([[1, 2, 2], [5, 1, 9]])
        (emb(x).square().sum() * 4).backward()
        (reference(x).square().sum() * 4).backward()
        got = torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], max_norm=1.0)
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
        torch.testing.assert_close(got, want)
        assert got > 1.0, "the gradients were clipped"
        opt.step()
        ref_opt.step()
        emb.flush()
        torch.testing.assert_close(all_rows(table), reference.weight.detach(), atol=1e-6, rtol=1e-6)
