"""Worker of tests/kernels/test_partial_fc.py and test_reshard.py: one rank of a gloo group on CPU.

Every rank builds the same global inputs from ``seed`` (:func:`make_inputs`), takes its rows of the
batch and its shard of the class centres, runs each case of :data:`CASES` and saves what it computed
to ``out_dir/rank{r}.pt`` for the parent to compare with one process.
"""

import faulthandler
import gc
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

WORLD, LOCAL_BATCH, DIM, NUM_CLASSES = 2, 6, 8, 41  # shards of 21 and 20 classes


def make_inputs(seed, world=WORLD, local_batch=LOCAL_BATCH, dim=DIM, num_classes=NUM_CLASSES):
    """The global batch: embeddings [B, D], labels [B], two labels [B, 2] with mixup weights [B, 2], three soft
    labels [B, 3] with weights [B, 3], and the whole head [C, D].  Rows 1 and 7 point away from their centre
    (theta near pi: CosFace's target probability falls below 1e-30, ArcFace's angle passes pi)."""
    g = torch.Generator().manual_seed(seed)
    batch = world * local_batch
    weight = 0.1 * torch.randn(num_classes, dim, generator=g)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    embeddings = torch.randn(batch, dim, generator=g)
    for row in (1, 7):
        embeddings[row] = -3.0 * weight[labels[row]] + 0.01 * torch.randn(dim, generator=g)
    lam = torch.rand(batch, 1, generator=g)
    two = torch.stack([labels, torch.randint(0, num_classes, (batch,), generator=g)], 1)
    soft = torch.randint(0, num_classes, (batch, 3), generator=g)
    soft_weights = torch.softmax(torch.randn(batch, 3, generator=g), 1)
    return dict(
        embeddings=embeddings,
        labels=labels,
        two=two,
        two_weights=torch.cat([lam, 1 - lam], 1),
        soft=soft,
        soft_weights=soft_weights,
        weight=weight,
    )


class CombinedMarginLoss:
    """The attributes of arcface_torch's ``losses.CombinedMarginLoss`` that a margin object carries
    (PartialFC reads them; calling it is PartialFC_V2's business, not ours)."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold

    def __call__(self, logits, labels):
        raise AssertionError("PartialFC must not call the margin object")


# CosFace at s=64 takes rows 1 and 7 below the probability floor; ArcFace at s=32 leaves them above it, where
# its angle passing pi (no fallback) shows in the loss.
INSIGHTFACE = {"cosface": (64.0, 1.0, 0.0, 0.4), "arcface": (32.0, 1.0, 0.5, 0.0)}

# name -> (margin: insightface kind or (m1, m2, m3) with s=32, sample rate, filtering threshold, targets)
CASES = {
    **{
        f"insightface-{kind}-rate{rate}": (kind, rate, 0.0, "labels")
        for kind in INSIGHTFACE
        for rate in (1.0, 0.5, 0.2)
    },
    "insightface-cosface-rate0.5-filter": ("cosface", 0.5, 0.2, "labels"),
    "insightface-arcface-rate1.0-filter": ("arcface", 1.0, 0.2, "labels"),
    "ours-arcface": ((1.0, 0.5, 0.0), 1.0, 0.0, "labels"),
    "ours-combined": ((0.9, 0.3, 0.2), 1.0, 0.0, "labels"),
    "ours-mixup": ((1.0, 0.0, 0.4), 1.0, 0.0, "two"),
    "ours-soft": ((1.0, 0.5, 0.0), 1.0, 0.0, "soft"),
    "ours-mixup-rate0.5": ((1.0, 0.5, 0.0), 0.5, 0.0, "two"),
}


def case_seed(seed, name, rank):
    """The seed of the default generator before the case's forward on ``rank`` (the parent redraws from it)."""
    return seed + 1000 * list(CASES).index(name) + rank


def build_head(name, rank):
    from lafs_kernels.nn import PartialFC

    margin, rate, threshold, _ = CASES[name]
    if isinstance(margin, str):
        s, m1, m2, m3 = INSIGHTFACE[margin]
        return PartialFC(CombinedMarginLoss(s, m1, m2, m3, threshold), DIM, NUM_CLASSES, rate, False)
    return PartialFC(margin, DIM, NUM_CLASSES, rate, False, s=32.0)


@contextmanager
def gloo_group(rank, world, port):
    """This process as ``rank`` of a gloo group for the ``with`` body; on a clean exit every rank meets at a
    barrier before any closes its connections, so none hangs up on a peer still inside a collective.  Python
    stacks are printed if the process aborts (a crash inside gloo then says where it happened)."""
    faulthandler.enable()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
        gc.collect()  # heads and autograd graphs holding the group go before it is destroyed
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(rank, world, port, seed, out_dir):
    with gloo_group(rank, world, port):
        run_cases(rank, world, seed, out_dir)


def run_cases(rank, world, seed, out_dir):
    """Every case of :data:`CASES` on this rank; saves ``rank{r}.pt`` and the head's ``softmax_fc_gpu_{r}.pt``."""
    import lafs_kernels

    data = make_inputs(seed, world)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    results = {}
    for name, (_, _, _, targets) in CASES.items():
        head = build_head(name, rank)
        with torch.no_grad():
            head.weight.copy_(data["weight"][head.class_start : head.class_start + head.num_local])
        local_x = data["embeddings"][rows].clone().requires_grad_()
        weights = None if targets == "labels" else data[f"{targets}_weights"][rows]
        torch.manual_seed(case_seed(seed, name, rank))
        loss, argmax = head(local_x, data[targets][rows], weights, return_argmax=True)
        loss.backward()
        sampled = None if head.sampled_index is None else head.sampled_index + head.class_start
        results[name] = dict(
            argmax=argmax,
            loss=loss.detach(),
            grad_x=local_x.grad,
            grad_w=head.weight.grad,
            class_start=head.class_start,
            sampled=sampled,
        )
    # the public function with a process group: whole batch on every rank, this rank's shard of W
    start, count = results[name]["class_start"], head.num_local
    for targets in ("labels", "two"):
        x = data["embeddings"].clone().requires_grad_()
        w = data["weight"][start : start + count].clone().requires_grad_()
        kwargs = {} if targets == "labels" else {"label_weights": data["two_weights"]}
        loss, argmax = lafs_kernels.margin_softmax_cross_entropy(
            x,
            w,
            data[targets],
            s=32.0,
            m1=1.0,
            m2=0.3,
            m3=0.1,
            label_smoothing=0.1,
            return_argmax=True,
            process_group=dist.group.WORLD,
            **kwargs,
        )
        loss.backward()
        results[f"function-{targets}"] = dict(
            loss=loss.detach(), argmax=argmax, grad_x=x.grad, grad_w=w.grad, class_start=start
        )
    # a label out of range on rank 1 only: every rank must raise (none may wait in a collective)
    head = build_head("insightface-arcface-rate1.0", rank)
    labels = data["labels"][rows].clone()
    if rank == 1:
        labels[0] = NUM_CLASSES
    try:
        head(data["embeddings"][rows], labels)
        results["bad-label"] = {"error": None}
    except ValueError as exc:
        results["bad-label"] = {"error": str(exc)}
    # arcface_torch's checkpoint of the head: each rank's state dict in softmax_fc_gpu_{rank}.pt
    head = build_head("insightface-arcface-rate1.0", rank)
    with torch.no_grad():
        head.weight.copy_(data["weight"][head.class_start : head.class_start + head.num_local])
    torch.save(head.state_dict(), os.path.join(out_dir, f"softmax_fc_gpu_{rank}.pt"))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def run_loss_from_files(rank, world, port, seed, in_dir, out_dir):
    """Load this rank's ``softmax_fc_gpu_{rank}.pt`` into the ArcFace head and save its loss on the global batch."""
    with gloo_group(rank, world, port):
        save_loss_from_file(rank, world, seed, in_dir, out_dir)


def save_loss_from_file(rank, world, seed, in_dir, out_dir):
    data = make_inputs(seed)
    local_batch = data["labels"].shape[0] // world
    rows = slice(rank * local_batch, (rank + 1) * local_batch)
    head = build_head("insightface-arcface-rate1.0", rank)
    head.load_state_dict(torch.load(os.path.join(in_dir, f"softmax_fc_gpu_{rank}.pt"), weights_only=True))
    loss = head(data["embeddings"][rows], data["labels"][rows])
    torch.save(loss.detach(), os.path.join(out_dir, f"loss{rank}.pt"))
