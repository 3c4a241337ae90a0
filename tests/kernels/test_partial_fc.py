"""PartialFC: one process against the fused op and against PartialFC_V2's maths; two gloo ranks against one process."""

import math
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from lafs_kernels import margin_softmax_cross_entropy
from lafs_kernels.nn import PartialFC
from tests.tolerances import assert_close

import margin_distributed_worker as worker
from helpers.margin import GRAD_SCALE, loss_and_grads

ARCFACE = dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)


def partial_fc_v2_statement(x, kept_weight, labels, s, m1, m2, m3, threshold=0.0):
    """PartialFC_V2's loss of one process holding every kept centre, written from the facts of its code
    (dense, in the inputs' dtype): x [B, D], kept_weight [K, D], labels [B] rows of kept_weight.

    cosines clamped to [-1, 1]; non-target cosines above the threshold become 0 without gradient; ArcFace
    (m1 == 1, m3 == 0): every logit cos(acos(c) + m2 * is_target) with the gradient of c; CosFace (m3 > 0):
    the target minus m3; all times s.  Loss -mean log max(p_target, 1e-30), gradient (softmax - onehot) / B.
    """
    cos = (F.normalize(x) @ F.normalize(kept_weight).T).clamp(-1, 1)
    is_target = F.one_hot(labels, cos.shape[1]).bool()
    if threshold > 0:
        cos = cos * (is_target | (cos.detach() <= threshold))
    if m1 == 1 and m3 == 0:
        margined = torch.cos(torch.acos(cos.detach()) + m2 * is_target)
        logits = s * (cos + (margined - cos).detach())
    else:
        assert m3 > 0
        logits = s * (cos - m3 * is_target)
    p_target = torch.softmax(logits, 1).gather(1, labels[:, None])[:, 0]
    value = -torch.log(p_target.clamp_min(1e-30)).mean()
    cross_entropy = F.cross_entropy(logits, labels)
    return cross_entropy + (value - cross_entropy).detach()


def partial_fc_v2_sample(seed, num_local, num_sample, positives):
    """PartialFC_V2's draw: one uniform key per local class from the CPU generator, positives forced to the
    top, the num_sample largest kept (sorted); exactly the positives, and no draw, when there are more of
    them.  Returns the kept rows and the generator's state after the draw."""
    generator = torch.Generator().manual_seed(seed)
    if num_sample < positives.numel():
        return positives, generator.get_state()
    perm = torch.rand(num_local, generator=generator)
    perm[positives] = 2.0
    return perm.topk(num_sample).indices.sort().values, generator.get_state()


# ----------------------------------------------------------------------------- one process


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


@pytest.mark.parametrize("rate, expected_rows", [(0.1, "positives"), (0.6, "num_sample")])
def test_sampling_count_and_draw_follow_partial_fc_v2(rng, rate, expected_rows):
    head = PartialFC((1.0, 0.0, 0.4), 8, 200, sample_rate=rate)
    x = torch.randn(30, 8, generator=rng, requires_grad=True)
    labels = torch.randint(0, 200, (30,), generator=rng)
    positives = labels.unique()
    assert positives.numel() > head.num_sample if expected_rows == "positives" else positives.numel() <= head.num_sample
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    torch.manual_seed(seed)
    loss = head(x, labels)
    loss.backward()
    index = head.sampled_index
    expected_index, expected_state = partial_fc_v2_sample(seed, 200, head.num_sample, positives)
    assert torch.equal(index, expected_index)
    assert torch.equal(torch.get_rng_state(), expected_state)  # the next steps' draws stay in step with theirs
    ref = loss_and_grads(margin_softmax_cross_entropy, x, head.weight[index], torch.searchsorted(index, labels), m3=0.4)
    assert_close(loss, ref[0])
    assert_close(x.grad, ref[1], scale=GRAD_SCALE)
    assert_close(head.weight.grad[index], ref[2], scale=GRAD_SCALE)
    unused = torch.ones(200, dtype=torch.bool)
    unused[index] = False
    assert (head.weight.grad[unused] == 0).all()
    head.eval()  # no sampling outside training
    assert_close(head(x, labels), margin_softmax_cross_entropy(x, head.weight, labels, m3=0.4))


@pytest.mark.parametrize("kind, threshold", [("cosface", 0.0), ("arcface", 0.0), ("cosface", 0.2), ("arcface", 0.2)])
def test_insightface_margin_object_trains_as_partial_fc_v2_in_one_process(kind, threshold):
    data = worker.make_inputs(7)
    s, m1, m2, m3 = worker.INSIGHTFACE[kind]
    head = PartialFC(worker.CombinedMarginLoss(s, m1, m2, m3, threshold), worker.DIM, worker.NUM_CLASSES, 1.0, False)
    with torch.no_grad():
        head.weight.copy_(data["weight"])
    x = data["embeddings"].clone().requires_grad_()
    loss = head(x, data["labels"])
    loss.backward()
    ref = loss_and_grads(
        partial_fc_v2_statement,
        data["embeddings"].double(),
        data["weight"].double(),
        data["labels"],
        s,
        m1,
        m2,
        m3,
        threshold,
    )
    if kind == "cosface":  # rows 1 and 7: target probability below the floor
        cos = F.cosine_similarity(data["embeddings"][[1, 7]], data["weight"][data["labels"][[1, 7]]])
        assert (cos < -0.99).all()
    assert_close(loss, ref[0], dtype=torch.float32)
    assert_close(x.grad, ref[1], dtype=torch.float32, scale=GRAD_SCALE)
    assert_close(head.weight.grad, ref[2], dtype=torch.float32, scale=GRAD_SCALE)


def test_insightface_margin_mapping_and_errors():
    cosface = PartialFC(worker.CombinedMarginLoss(32.0, 1.0, 0.3, 0.35), 8, 20, 1.0, False)
    assert (cosface.s, cosface.m1, cosface.m2, cosface.m3) == (32.0, 1.0, 0.0, 0.35)  # their m3 > 0 branch drops m2
    arcface = PartialFC(worker.CombinedMarginLoss(64.0, 1.0, 0.5, 0.0), 8, 20, 1.0, False)
    assert arcface.margin_grad == "straight_through" and not arcface.margin.fallback
    assert PartialFC((1.0, 0.5, 0.0), 8, 20).margin_grad == "exact"
    with pytest.raises(ValueError, match="m1 == 1 with m3 == 0"):
        PartialFC(worker.CombinedMarginLoss(64.0, 0.9, 0.4, 0.0), 8, 20)
    with pytest.raises(TypeError, match="margin must be"):
        PartialFC(0.5, 8, 20)
    head = PartialFC((1.0, 0.5, 0.0), 8, 20)
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="need label_weights"):
        head(x, torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"local_embeddings must be \[b, 8\]"):
        head(x[:, :5], torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"PartialFC: labels must lie in \[0, 20\) \(num_classes\); got min -1"):
        head(x, torch.tensor([0, 3, -1, 19]))
    with pytest.raises(ValueError, match="got min 0, max 20"):
        head(x, torch.tensor([0, 3, 20, 19]))
    with pytest.raises(ValueError, match="chunk_size must be positive; got 0"):
        PartialFC((1.0, 0.5, 0.0), 8, 20, chunk_size=0)


def test_torch_compile_fullgraph_keeps_the_label_check(rng):
    head = PartialFC((1.0, 0.0, 0.4), 8, 20)
    x = torch.randn(4, 8, generator=rng)
    labels = torch.randint(0, 20, (4,), generator=rng)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, labels), head(x, labels))
    with pytest.raises(ValueError, match=r"PartialFC: labels must lie in \[0, 20\).*max 20"):
        compiled(x, torch.full_like(labels, 20))


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_argmax_on_one_process_is_the_best_class_it_used(rng, rate):
    head = PartialFC((1.0, 0.0, 0.4), 8, 60, sample_rate=rate)
    x = torch.randn(10, 8, generator=rng)
    labels = torch.randint(0, 60, (10,), generator=rng)
    torch.manual_seed(5)
    loss, argmax = head(x, labels, return_argmax=True)
    used = torch.arange(60) if head.sampled_index is None else head.sampled_index
    cos = F.normalize(x) @ F.normalize(head.weight.detach()[used]).T
    assert torch.equal(argmax, used[cos.argmax(1)])
    torch.manual_seed(5)  # the same sample: the argmax leaves the loss as it is
    assert torch.equal(loss, head(x, labels))


def test_two_labels_in_one_call_equal_the_fused_soft_target_loss(rng):
    head = PartialFC((1.0, 0.5, 0.0), 8, 30, s=32.0)
    x = torch.randn(6, 8, generator=rng, requires_grad=True)
    labels = torch.randint(0, 30, (6, 2), generator=rng)
    lam = torch.rand(6, 1, generator=rng)
    weights = torch.cat([lam, 1 - lam], 1)
    loss = head(x, labels, weights)
    loss.backward()
    ref = loss_and_grads(margin_softmax_cross_entropy, x, head.weight, labels, label_weights=weights, s=32.0, m2=0.5)
    assert_close(loss, ref[0])
    assert_close(x.grad, ref[1], scale=GRAD_SCALE)
    assert_close(head.weight.grad, ref[2], scale=GRAD_SCALE)


# ----------------------------------------------------------------------------- two gloo processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SEED = 1234


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case of the worker on 2 gloo ranks, run once: (per-rank results, folder with the ranks' files)."""
    out = tmp_path_factory.mktemp("partial_fc")
    mp.spawn(worker.run, args=(worker.WORLD, free_port(), SEED, str(out)), nprocs=worker.WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(worker.WORLD)], out


def rows_of(rank):
    return slice(rank * worker.LOCAL_BATCH, (rank + 1) * worker.LOCAL_BATCH)


def kept_classes(ranks, name, labels):
    """The classes each rank used, in rank order (all of them at sample rate 1), and the labels as rows of them."""
    if ranks[0][name]["sampled"] is None:
        classes = torch.arange(worker.NUM_CLASSES)
    else:
        classes = torch.cat([r[name]["sampled"] for r in ranks])
    assert torch.isin(labels, classes).all()
    return classes, torch.searchsorted(classes, labels)


def check_ranks(ranks, name, loss, grad_x, grad_w, classes):
    """Each rank's loss equals ``loss``; its embedding gradient is world times the global one (rows of this
    rank); its centres' gradient is the global one at the classes it used, zero elsewhere."""
    for rank, r in enumerate(ranks):
        got = r[name]
        assert_close(got["loss"], loss, dtype=torch.float32, msg=f"{name}: loss, rank {rank}")
        assert_close(
            got["grad_x"],
            worker.WORLD * grad_x[rows_of(rank)],
            dtype=torch.float32,
            scale=GRAD_SCALE,
            msg=f"{name}: grad x, rank {rank}",
        )
        start = got["class_start"]
        expected = torch.zeros_like(got["grad_w"], dtype=grad_w.dtype)
        mine = (classes >= start) & (classes < start + expected.shape[0])
        expected[classes[mine] - start] = grad_w[mine]
        assert_close(got["grad_w"], expected, dtype=torch.float32, scale=GRAD_SCALE, msg=f"{name}: grad w, rank {rank}")


@pytest.mark.distributed
def test_a_label_out_of_range_on_one_rank_raises_on_every_rank(two_ranks):
    ranks, _ = two_ranks
    for rank, r in enumerate(ranks):
        error = r["bad-label"]["error"]
        assert error is not None and "labels must lie in [0, 41)" in error, f"rank {rank}: {error}"
        assert "max 41" in error, f"rank {rank}: {error}"


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in worker.CASES if n.startswith("insightface")])
def test_two_ranks_train_as_partial_fc_v2(two_ranks, name):
    ranks, _ = two_ranks
    kind, rate, threshold, _ = worker.CASES[name]
    data = worker.make_inputs(SEED)
    labels = data["labels"]
    classes, rows = kept_classes(ranks, name, labels)
    for rank, r in enumerate(ranks):  # the classes PartialFC_V2 draws from the same generator state
        start, num_local = r[name]["class_start"], r[name]["grad_w"].shape[0]
        assert (start, num_local) == ((0, 21) if rank == 0 else (21, 20))
        if rate < 1:
            positives = (labels[(labels >= start) & (labels < start + num_local)] - start).unique()
            seed = worker.case_seed(SEED, name, rank)
            drawn, _ = partial_fc_v2_sample(seed, num_local, int(rate * num_local), positives)
            assert torch.equal(r[name]["sampled"], drawn + start), f"{name}: sampled classes, rank {rank}"
    s, m1, m2, m3 = worker.INSIGHTFACE[kind]
    ref = loss_and_grads(
        partial_fc_v2_statement,
        data["embeddings"].double(),
        data["weight"][classes].double(),
        rows,
        s,
        m1,
        m2,
        m3,
        threshold,
    )
    check_ranks(ranks, name, *ref, classes)


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n in worker.CASES if n.startswith("ours")])
def test_two_ranks_equal_the_fused_loss_with_the_whole_head(two_ranks, name):
    """Our margins (ArcFace fallback, exact gradient), one label, two (mixup) or three (soft) in one call."""
    ranks, _ = two_ranks
    margin, _, _, targets = worker.CASES[name]
    data = worker.make_inputs(SEED)
    labels = data[targets]
    classes, rows = kept_classes(ranks, name, labels)
    kwargs = {} if targets == "labels" else {"label_weights": data[f"{targets}_weights"]}
    m1, m2, m3 = margin
    ref = loss_and_grads(
        margin_softmax_cross_entropy,
        data["embeddings"].double(),
        data["weight"][classes].double(),
        rows,
        s=32.0,
        m1=m1,
        m2=m2,
        m3=m3,
        **kwargs,
    )
    check_ranks(ranks, name, *ref, classes)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(worker.CASES))
def test_two_ranks_give_each_embedding_its_best_class_over_every_shard(two_ranks, name):
    """The training accuracy's argmax: over every rank's centres (at sample rate < 1, over the classes the
    step used), for this rank's rows."""
    ranks, _ = two_ranks
    data = worker.make_inputs(SEED)
    classes, _ = kept_classes(ranks, name, data[worker.CASES[name][3]])
    cos = F.normalize(data["embeddings"].double()) @ F.normalize(data["weight"][classes].double()).T
    expected = classes[cos.argmax(1)]
    for rank, r in enumerate(ranks):
        assert torch.equal(r[name]["argmax"], expected[rows_of(rank)]), f"{name}: argmax, rank {rank}"


@pytest.mark.distributed
@pytest.mark.parametrize("targets", ["labels", "two"])
def test_function_with_process_group_equals_one_process(two_ranks, targets):
    ranks, _ = two_ranks
    data = worker.make_inputs(SEED)
    kwargs = {} if targets == "labels" else {"label_weights": data["two_weights"]}
    x = data["embeddings"].clone().requires_grad_()
    w = data["weight"].clone().requires_grad_()
    loss, argmax = margin_softmax_cross_entropy(
        x, w, data[targets], s=32.0, m1=1.0, m2=0.3, m3=0.1, label_smoothing=0.1, return_argmax=True, **kwargs
    )
    loss.backward()
    for rank, r in enumerate(ranks):
        got = r[f"function-{targets}"]
        assert_close(got["loss"], loss, msg=f"function loss, rank {rank}")
        assert torch.equal(got["argmax"], argmax)
        assert_close(got["grad_x"], x.grad, scale=GRAD_SCALE, msg=f"function grad x, rank {rank}")
        shard = slice(got["class_start"], got["class_start"] + got["grad_w"].shape[0])
        assert_close(got["grad_w"], w.grad[shard], scale=GRAD_SCALE, msg=f"function grad w, rank {rank}")


def test_probability_floor_changes_the_value_not_the_gradient():
    """Sanity of the statement above: the floor is active on rows 1 and 7 of the inputs (CosFace)."""
    data = worker.make_inputs(SEED)
    x, w = data["embeddings"].double(), data["weight"].double()
    logits = 64.0 * (F.normalize(x) @ F.normalize(w).T - 0.4 * F.one_hot(data["labels"], worker.NUM_CLASSES))
    nll = F.cross_entropy(logits, data["labels"], reduction="none")
    assert (nll[[1, 7]] > -math.log(1e-30)).all()
    floored = partial_fc_v2_statement(x, w, data["labels"], 64.0, 1.0, 0.0, 0.4)
    assert_close(floored, nll.clamp(max=-math.log(1e-30)).mean())


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_resharded_head_gives_the_same_loss(two_ranks, tmp_path, world):
    """The 2 ranks' softmax_fc_gpu_{rank}.pt files, resharded by the command to 1 or 3 ranks and loaded there,
    give the loss the 2 ranks computed on the same global batch."""
    from lafs_kernels.reshard import main

    ranks, files = two_ranks
    main(
        [str(files / f"softmax_fc_gpu_{r}.pt") for r in range(worker.WORLD)]
        + ["--world-size", str(world), "--out", str(tmp_path)]
    )
    expected = ranks[0]["insightface-arcface-rate1.0"]["loss"]
    if world == 1:
        data = worker.make_inputs(SEED)
        head = worker.build_head("insightface-arcface-rate1.0", 0)
        head.load_state_dict(torch.load(tmp_path / "softmax_fc_gpu_0.pt", weights_only=True))
        losses = [head(data["embeddings"], data["labels"]).detach()]
    else:
        args = (world, free_port(), SEED, str(tmp_path), str(tmp_path))
        mp.spawn(worker.run_loss_from_files, args=args, nprocs=world)
        losses = [torch.load(tmp_path / f"loss{r}.pt") for r in range(world)]
    for loss in losses:
        assert_close(loss, expected)
