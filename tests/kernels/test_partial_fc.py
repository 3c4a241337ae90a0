"""PartialFC: single process against the fused op, and two gloo ranks against one process."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lafs_kernels import margin_softmax_cross_entropy
from lafs_kernels.nn import PartialFC
from tests.tolerances import assert_close

import margin_distributed_worker as worker

ARCFACE = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)
GRAD_SCALE = 8.0  # as in test_margin_softmax: logits are s times the cosines


def loss_and_grads(fn, x, w, *args, **kwargs):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(x, w, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def test_single_process_equals_fused_op(rng):
    head = PartialFC((1.0, 0.5, 0.0), 16, 50)
    assert (head.num_local, head.class_start, head.world_size) == (50, 0, 1)
    x = torch.randn(8, 16, generator=rng, requires_grad=True)
    labels = torch.randint(0, 50, (8, 1), generator=rng)  # PartialFC_V2 accepts [b, 1] labels too
    loss = head(x, labels)
    loss.backward()
    ref = loss_and_grads(margin_softmax_cross_entropy, x, head.weight, labels[:, 0], **ARCFACE)
    assert_close(loss, ref[0])
    assert_close(x.grad, ref[1], scale=GRAD_SCALE)
    assert_close(head.weight.grad, ref[2], scale=GRAD_SCALE)


def test_sampling_keeps_every_positive_and_matches_op_on_the_sample(rng):
    head = PartialFC((1.0, 0.0, 0.4), 8, 200, sample_rate=0.1)
    x = torch.randn(30, 8, generator=rng, requires_grad=True)
    labels = torch.randint(0, 200, (30,), generator=rng)
    loss = head(x, labels)
    loss.backward()
    index = head.sampled_index
    assert index.shape == (30,)  # max(0.1 * 200, batch 30): fixed size, no host sync
    assert torch.equal(index, index.sort().values) and index.unique().numel() == 30
    assert torch.isin(labels, index).all()
    ref = loss_and_grads(margin_softmax_cross_entropy, x, head.weight[index], torch.searchsorted(index, labels), m3=0.4)
    assert_close(loss, ref[0])
    assert_close(x.grad, ref[1], scale=GRAD_SCALE)
    assert_close(head.weight.grad[index], ref[2], scale=GRAD_SCALE)
    unused = torch.ones(200, dtype=torch.bool)
    unused[index] = False
    assert (head.weight.grad[unused] == 0).all()
    head.eval()  # no sampling outside training
    assert_close(head(x, labels), margin_softmax_cross_entropy(x, head.weight, labels, m3=0.4))


def test_accepts_insightface_combined_margin_loss(rng):
    class CombinedMarginLoss:  # the attributes arcface_torch's CombinedMarginLoss carries
        s, m1, m2, m3, interclass_filtering_threshold = 32.0, 1.0, 0.0, 0.35, 0.0

    head = PartialFC(CombinedMarginLoss(), 8, 20, 1.0, False)
    assert (head.s, head.m1, head.m2, head.m3) == (32.0, 1.0, 0.0, 0.35)
    x = torch.randn(4, 8, generator=rng)
    labels = torch.randint(0, 20, (4,), generator=rng)
    assert_close(head(x, labels), margin_softmax_cross_entropy(x, head.weight, labels, s=32.0, m3=0.35))
    with pytest.raises(TypeError, match="margin must be"):
        PartialFC(0.5, 8, 20)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_equal_one_process_with_and_without_sampling(tmp_path):
    world, local_batch, dim, num_classes, rate, seed = 2, 6, 8, 41, 0.3, 1234
    mp.spawn(worker.run, args=(world, free_port(), seed, str(tmp_path), local_batch, dim, num_classes, rate), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    embeddings, labels, weight = worker.make_inputs(seed, world, local_batch, dim, num_classes)
    for r in ranks:  # shards as PartialFC_V2 splits them: 21 + 20 classes
        assert r[1.0]["class_start"] == (0 if r is ranks[0] else 21)

    for rate in (1.0, rate):
        if rate == 1.0:
            classes = torch.arange(num_classes)
        else:
            classes = torch.cat([r[rate]["sampled"] for r in ranks])  # the same sampled classes
            assert torch.isin(labels, classes).all()
        w = weight.clone().requires_grad_()
        x = embeddings.clone().requires_grad_()
        loss = margin_softmax_cross_entropy(x, w[classes], torch.searchsorted(classes, labels), s=32.0, m1=1.0, m2=0.5, m3=0.0)
        loss.backward()
        for rank, r in enumerate(ranks):
            got = r[rate]
            assert_close(got["loss"], loss, msg=f"loss, rank {rank}, rate {rate}")
            rows = slice(rank * local_batch, (rank + 1) * local_batch)
            assert_close(got["grad_x"], x.grad[rows], scale=GRAD_SCALE, msg=f"grad x, rank {rank}, rate {rate}")
            shard = slice(got["class_start"], got["class_start"] + got["grad_w"].shape[0])
            assert_close(got["grad_w"], w.grad[shard], scale=GRAD_SCALE, msg=f"grad w, rank {rank}, rate {rate}")

    x = embeddings.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    loss, argmax = margin_softmax_cross_entropy(
        x, w, labels, s=32.0, m1=1.0, m2=0.3, m3=0.1, label_smoothing=0.1, return_argmax=True
    )
    loss.backward()
    for rank, r in enumerate(ranks):
        got = r["function"]
        assert_close(got["loss"], loss, msg=f"function loss, rank {rank}")
        assert torch.equal(got["argmax"], argmax)
        assert_close(got["grad_x"], x.grad, scale=GRAD_SCALE, msg=f"function grad x, rank {rank}")
        shard = slice(got["class_start"], got["class_start"] + got["grad_w"].shape[0])
        assert_close(got["grad_w"], w.grad[shard], scale=GRAD_SCALE, msg=f"function grad w, rank {rank}")
