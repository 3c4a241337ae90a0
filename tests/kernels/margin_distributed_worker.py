"""Worker of tests/kernels/test_partial_fc.py: one rank of a gloo group on CPU.

Every rank builds the same inputs from ``seed``, holds its shard of the class centres,
and saves what it computed to ``out_dir/rank{r}.pt`` for the parent to compare with one
process holding every class.
"""
import torch
import torch.distributed as dist


def make_inputs(seed, world, local_batch, dim, num_classes):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(world * local_batch, dim, generator=g)
    labels = torch.randint(0, num_classes, (world * local_batch,), generator=g)
    weight = 0.1 * torch.randn(num_classes, dim, generator=g)
    return embeddings, labels, weight


def run(rank, world, port, seed, out_dir, local_batch, dim, num_classes, sample_rate):
    import lafs_kernels
    from lafs_kernels.nn import PartialFC

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        embeddings, labels, weight = make_inputs(seed, world, local_batch, dim, num_classes)
        rows = slice(rank * local_batch, (rank + 1) * local_batch)
        results = {}
        for rate in (1.0, sample_rate):
            torch.manual_seed(seed + rank)
            head = PartialFC((1.0, 0.5, 0.0), dim, num_classes, rate, s=32.0)
            with torch.no_grad():
                head.weight.copy_(weight[head.class_start : head.class_start + head.num_local])
            local_x = embeddings[rows].clone().requires_grad_()
            loss = head(local_x, labels[rows])
            loss.backward()
            sampled = None if head.sampled_index is None else head.sampled_index + head.class_start
            results[rate] = dict(loss=loss.detach(), grad_x=local_x.grad, grad_w=head.weight.grad,
                                 class_start=head.class_start, sampled=sampled)
        # the public function with a process group: whole batch on every rank, this rank's shard of W
        start, count = results[1.0]["class_start"], head.num_local
        x = embeddings.clone().requires_grad_()
        w = weight[start : start + count].clone().requires_grad_()
        loss, argmax = lafs_kernels.margin_softmax_cross_entropy(
            x, w, labels, s=32.0, m1=1.0, m2=0.3, m3=0.1, label_smoothing=0.1,
            return_argmax=True, process_group=dist.group.WORLD,
        )
        loss.backward()
        results["function"] = dict(loss=loss.detach(), argmax=argmax, grad_x=x.grad, grad_w=w.grad, class_start=start)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
