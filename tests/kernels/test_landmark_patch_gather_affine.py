"""The patch gather through a per-view affine (issue 21) and with N = V*B landmark rows, on every backend.

The float64 reference is ``grid_sample`` with autograd on a grid built here from the agreed formula
(``X_i = scale_x * (cx + i - P/2 - 0.5) + offset_x``, Y alike; row n samples image n % B), independent of
every backend.  Triton runs through the interpreter on small shapes.  Positions are computed in double by
the CPU and CUDA kernels and by the torch backend, in float32 by Triton: its tolerance adds the position
rounding (a few ulps of a coordinate of at most ~40 px, ~1e-5 px) times the image's steepest slope.
"""

import pytest
import torch
import torch.nn.functional as F

from lafs_kernels import landmark_patch_gather
from lafs_kernels._dispatch import call_of
from lafs_kernels.ops.landmark_patch_gather import BACKENDS, crop_affine, patch_gather_op
from tests.kernels.test_landmark_patch_gather import CPU_BACKENDS, GRADCHECK_BACKENDS, runnable, select
from tests.tolerances import assert_close


def affine_reference(image, landmarks, view_affine, patch_size, grad_tokens, index=None):
    """tokens, d image, d landmarks of the affine gather by grid_sample in float64 (zero for non-finite rows)."""
    B, C, H, W = image.shape
    P = patch_size
    image64 = image.detach().double().requires_grad_()
    landmarks64 = landmarks.detach().double().requires_grad_()
    centres = select(landmarks64, index)  # [N, K, 2]
    N, K = centres.shape[:2]
    a = view_affine.double()
    offsets = torch.arange(P, dtype=torch.float64) - P / 2 - 0.5
    x = a[:, 0, None, None] * (centres[..., 0, None] + offsets) + a[:, 2, None, None]  # [N, K, P] along i
    y = a[:, 1, None, None] * (centres[..., 1, None] + offsets) + a[:, 3, None, None]  # [N, K, P] along j
    grid_x = (x + 0.5) / W * 2 - 1
    grid_y = (y + 0.5) / H * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(grid_x[..., :, None], grid_y[..., None, :]), dim=-1)  # [N,K,P,P,2]
    source = image64.repeat(N // B, 1, 1, 1)  # row n = image n % B
    sampled = F.grid_sample(source, grid.reshape(N, K * P, P, 2), align_corners=False)  # [N, C, K*P, P]
    tokens = sampled.reshape(N, C, K, P, P).permute(0, 2, 3, 4, 1).reshape(N, K, P * P * C)
    tokens.backward(grad_tokens.double())
    return tokens.detach(), image64.grad, landmarks64.grad


def random_views(rng, *, batch=2, views=3, channels=3, size=(16, 13), landmarks=6, patch_size=8, dtype=torch.float32):
    """image [B, C, H, W], landmarks [V*B, L, 2] in view pixels, view_affine [V*B, 4]: crops of 0.3..1.6 times the
    view size (zoom in and out), every second one flipped, offsets that push patches off the image."""
    H, W = size
    N = views * batch
    image = torch.randn(batch, channels, H, W, generator=rng, dtype=torch.float64).to(dtype)
    S = 12.0  # the views' nominal size in view pixels
    points = torch.rand(N, landmarks, 2, generator=rng, dtype=torch.float64) * (S + 2 * patch_size) - patch_size
    scale = 0.3 + 1.3 * torch.rand(N, 2, generator=rng, dtype=torch.float64)
    scale[1::2, 0] *= -1  # horizontal flips
    offset = (torch.rand(N, 2, generator=rng, dtype=torch.float64) - 0.25) * torch.tensor([W, H])
    affine = torch.cat([scale, offset], dim=1)
    coord_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return image, points.to(coord_dtype), affine.to(coord_dtype)


def steepest_slope(image):
    """Largest difference between neighbouring pixels (the token error per pixel of position error)."""
    image = image.double()
    return max(
        (image[..., 1:, :] - image[..., :-1, :]).abs().max().item(),
        (image[..., :, 1:] - image[..., :, :-1]).abs().max().item(),
    )


def run_backend(image, landmarks, affine, patch_size, grad_tokens, backend, **kwargs):
    image = image.detach().clone().requires_grad_()
    landmarks = landmarks.detach().clone().requires_grad_()
    tokens = landmark_patch_gather(image, landmarks, patch_size, backend=backend, view_affine=affine, **kwargs)
    tokens.backward(grad_tokens.to(tokens.dtype))
    return tokens.detach(), image.grad, landmarks.grad


def assert_matches_affine_reference(image, landmarks, affine, patch_size, backend, rng, index=None):
    N = landmarks.shape[0]
    C = image.shape[1]
    views = N // image.shape[0]
    K = landmarks.shape[1] if index is None else index.shape[1]
    grad_tokens = torch.randn(N, K, patch_size * patch_size * C, generator=rng, dtype=torch.float64)
    ref = affine_reference(image, landmarks, affine, patch_size, grad_tokens, index)
    got = run_backend(image, landmarks, affine, patch_size, grad_tokens, backend, index=index)
    assert got[0].shape == (N, K, patch_size * patch_size * C) and got[0].dtype == image.dtype
    # Triton: float32 positions (see the module docstring).
    position = 1.0 if backend != "triton" else 1.0 + steepest_slope(image)
    largest_scale = affine[:, :2].abs().max().item()
    assert_close(got[0], ref[0], scale=position, msg=f"{backend} tokens")
    # Up to 4 taps per sample, and every view of an image adds to its gradient.
    assert_close(got[1], ref[1], scale=4 * views * position, msg=f"{backend} image gradient")
    # P*P*C products per patch, times the scale of the map.
    assert_close(
        got[2],
        ref[2],
        scale=patch_size * patch_size * C * max(1.0, largest_scale) * position,
        msg=f"{backend} landmark gradient",
    )


# --------------------------------------------------------------------------- against the float64 reference


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("patch_size", [8, 5])
def test_affine_matches_reference_with_flips_zoom_and_repeats(backend, patch_size, rng):
    image, landmarks, affine = random_views(rng, patch_size=patch_size)
    index = torch.randint(0, 6, (6, 9), generator=rng)
    index[:, :2] = 4  # repeated: the landmark gradient accumulates over them
    assert_matches_affine_reference(image, landmarks, affine, patch_size, backend, rng, index=index)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_affine_channels_last_single_channel_and_one_view(backend, rng):
    image, landmarks, affine = random_views(rng, batch=3, views=1, channels=1, size=(14, 17), landmarks=5)
    assert_matches_affine_reference(image, landmarks, affine, 8, backend, rng)
    image, landmarks, affine = random_views(rng, batch=2, views=2, size=(15, 12), landmarks=4)
    image = image.contiguous(memory_format=torch.channels_last)
    assert_matches_affine_reference(image, landmarks, affine, 8, backend, rng)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_affine_float64_odd_patch(backend, rng):
    if backend == "triton":
        pytest.skip("triton computes in float32 and takes no float64 input")
    image, landmarks, affine = random_views(
        rng, batch=1, views=4, channels=2, size=(11, 14), patch_size=7, dtype=torch.float64
    )
    assert_matches_affine_reference(image, landmarks, affine, 7, backend, rng)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identity_affine_and_view_rows_equal_the_plain_gather(backend, rng):
    image, landmarks, _ = random_views(rng, views=2, landmarks=5)
    identity = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).expand(4, 4)
    with_identity = landmark_patch_gather(image, landmarks, 8, view_affine=identity, backend=backend)
    without = landmark_patch_gather(image, landmarks, 8, backend=backend)
    assert_close(with_identity, without)
    # N = V*B rows without an affine: row n gathers from image n % B.
    per_view = torch.cat(
        [landmark_patch_gather(image, landmarks[v * 2 : (v + 1) * 2], 8, backend=backend) for v in range(2)]
    )
    assert_close(without, per_view)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_patches_entirely_off_the_image_and_non_finite_affines(backend, rng):
    image, landmarks, affine = random_views(rng, views=2, landmarks=4)
    affine[0, 2] = 1e4  # every patch of row 0 far to the right
    affine[1, 1] = float("nan")
    affine[2, 3] = float("inf")
    landmarks[3, 1, 0] = float("nan")
    grad_tokens = torch.randn(4, 4, 192, generator=rng, dtype=torch.float64)
    tokens, grad_image, grad_landmarks = run_backend(image, landmarks, affine, 8, grad_tokens, backend)
    dropped = torch.zeros(4, 4, dtype=torch.bool)
    dropped[0] = dropped[1] = dropped[2] = True
    dropped[3, 1] = True
    assert torch.equal(tokens[dropped], torch.zeros_like(tokens[dropped]))
    assert torch.isfinite(grad_image).all() and torch.isfinite(grad_landmarks).all()
    assert torch.equal(grad_landmarks[dropped], torch.zeros_like(grad_landmarks[dropped]))
    # The rest is what the reference gives without the dropped patches.
    clean_affine = torch.where(torch.isfinite(affine), affine, torch.zeros_like(affine))
    clean_landmarks = torch.where(torch.isfinite(landmarks), landmarks, torch.zeros_like(landmarks))
    ref = affine_reference(image, clean_landmarks, clean_affine, 8, grad_tokens * (~dropped)[..., None])
    position = 1.0 if backend != "triton" else 1.0 + steepest_slope(image)
    assert_close(tokens[~dropped], ref[0][~dropped], scale=position)
    assert_close(grad_image, ref[1], scale=8 * position)


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_affine_gradcheck_float64(backend, rng):
    image, landmarks, affine = random_views(
        rng, batch=1, views=2, channels=2, size=(6, 5), landmarks=2, patch_size=3, dtype=torch.float64
    )
    index = torch.tensor([[0, 1, 1], [1, 0, 0]])
    image.requires_grad_()
    landmarks.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda im, lm: landmark_patch_gather(im, lm, 3, index=index, view_affine=affine, backend=backend),
        (image, landmarks),
        fast_mode=True,
    )


def test_cpu_image_gradient_with_views_is_bitwise_repeatable(rng):
    reasons = BACKENDS.why_not("cpu", call_of(torch.empty(0)))
    if reasons:
        pytest.skip("; ".join(reasons))
    torch.set_num_threads(2)
    image, landmarks, affine = random_views(rng, batch=4, views=3, size=(40, 36), landmarks=30)
    index = torch.randint(0, 30, (12, 60), generator=rng)
    grad_tokens = torch.randn(12, 60, 192, generator=rng)
    for view_affine in (affine, None):
        first = run_backend(image, landmarks, view_affine, 8, grad_tokens, "cpu", index=index, deterministic=True)
        for _ in range(3):
            again = run_backend(image, landmarks, view_affine, 8, grad_tokens, "cpu", index=index, deterministic=True)
            assert torch.equal(again[1], first[1]) and torch.equal(again[2], first[2])


def test_affine_gets_no_gradient(rng):
    image, landmarks, affine = random_views(rng, views=1, landmarks=3)
    affine.requires_grad_()
    tokens = landmark_patch_gather(image.requires_grad_(), landmarks, 4, view_affine=affine)
    tokens.sum().backward()
    assert affine.grad is None and image.grad is not None


# --------------------------------------------------------------------------- crop_affine and the materialised crop


def crop_then_gather(image, boxes, flips, size, landmarks, patch_size):
    """The original path: crop each box (integer pixels), resize to size x size (bilinear, align_corners=False,
    no antialias), flip, then gather at the landmarks in view pixels.  Returns tokens [N, L, P*P*C]."""
    B = image.shape[0]
    views = []
    for n, (box, flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
        x0, y0, w, h = (int(v) for v in box)
        crop = image[n % B : n % B + 1, :, y0 : y0 + h, x0 : x0 + w]
        view = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        views.append(view.flip(-1) if flip else view)
    views = torch.cat(views)
    return landmark_patch_gather(views, landmarks, patch_size, backend="torch")


def random_boxes(rng, batch, views, source, size, smallest):
    """Integer crop boxes (x0, y0, w, h) inside a source x source image, w, h >= smallest, and flips."""
    N = batch * views
    w = torch.randint(smallest, source + 1, (N,), generator=rng)
    h = torch.randint(smallest, source + 1, (N,), generator=rng)
    x0 = (torch.rand(N, generator=rng) * (source - w + 1)).long()
    y0 = (torch.rand(N, generator=rng) * (source - h + 1)).long()
    flips = torch.rand(N, generator=rng) < 0.5
    return torch.stack([x0, y0, w, h], dim=1), flips


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_resized_crop_at_view_pixels_matches_materialising_it(backend, rng):
    """At integer view positions one bilinear sample of the crop is exactly a pixel of the resized crop, so the
    affine gather must equal crop, resize, flip, gather to float rounding wherever the resize reads real
    neighbours (away from the crop's border, where interpolate repeats the edge pixel)."""
    B, V, source, size, P = 2, 3, 40, 24, 8
    image = torch.randn(B, 3, source, source, generator=rng, dtype=torch.float64).float()
    boxes, flips = random_boxes(rng, B, V, source, size, smallest=16)
    # Half-integer landmarks: x_i = lx + i - P/2 - 0.5 are whole view pixels.
    landmarks = torch.randint(P // 2 + 1, size - P // 2, (B * V, 5, 2), generator=rng).float() + 0.5
    ours = landmark_patch_gather(image, landmarks, P, view_affine=crop_affine(boxes, size, flips), backend=backend)
    theirs = crop_then_gather(image, boxes, flips, size, landmarks, P)
    # Samples whose resize source index lies strictly inside the crop (no edge clamping).
    scale = boxes[:, 2:].float() / size  # [N, 2]
    offsets = torch.arange(P) - P / 2 - 0.5
    x = landmarks[..., 0, None] + offsets  # [N, L, P] view pixels along i
    y = landmarks[..., 1, None] + offsets
    x_unflipped = torch.where(flips[:, None, None], size - 1 - x, x)
    src_x = (x_unflipped + 0.5) * scale[:, 0, None, None] - 0.5
    src_y = (y + 0.5) * scale[:, 1, None, None] - 0.5
    inside_x = (src_x > 0) & (src_x < boxes[:, 2, None, None] - 1)
    inside_y = (src_y > 0) & (src_y < boxes[:, 3, None, None] - 1)
    inside = (inside_x[..., :, None] & inside_y[..., None, :])[..., None].expand(-1, -1, -1, -1, 3)
    inside = inside.reshape(ours.shape)
    assert inside.float().mean() > 0.5
    position = 1.0 if backend != "triton" else 1.0 + steepest_slope(image)
    assert_close(ours[inside], theirs[inside], scale=4 * position, msg="resized crop at view pixels")


def test_crop_affine_formulas(rng):
    boxes = torch.tensor([[3.0, 5.0, 20.0, 30.0]])
    a = crop_affine(boxes, 10)
    assert torch.allclose(a, torch.tensor([[2.0, 3.0, 3.0 + 1.0 - 0.5, 5.0 + 1.5 - 0.5]]))
    flipped = crop_affine(boxes, 10, torch.tensor([True]))
    # View pixel x of the flip is view pixel 9 - x of the crop.
    for x in (0.0, 3.5, 9.0):
        assert torch.isclose(flipped[0, 0] * x + flipped[0, 2], a[0, 0] * (9 - x) + a[0, 2])
    with pytest.raises(ValueError, match="boxes must be a \\[N, 4\\]"):
        crop_affine(torch.zeros(4), 10)


# --------------------------------------------------------------------------- errors, opcheck, compile


def test_bad_view_affine_raises_clear_errors(rng):
    image, landmarks, affine = random_views(rng, views=2, landmarks=3)
    cases = [
        (ValueError, "view_affine must be a \\[N, 4\\] tensor .* N = 4", dict(view_affine=affine[:2])),
        (ValueError, "view_affine must be a \\[N, 4\\]", dict(view_affine=affine[:, :3])),
        (TypeError, "view_affine must be a floating-point", dict(view_affine=affine.long())),
        (ValueError, "view_affine is on meta", dict(view_affine=affine.to("meta"))),
        (ValueError, "landmarks batch 3 does not match image batch 2", dict(landmarks=landmarks[:3])),
        (ValueError, "index must be a \\[N, K\\] tensor with N = 4", dict(index=torch.zeros(2, 3, dtype=torch.long))),
    ]
    for error, message, change in cases:
        kwargs = dict(image=image, landmarks=landmarks, patch_size=4, view_affine=affine)
        kwargs.update(change)
        with pytest.raises(error, match=message):
            landmark_patch_gather(**kwargs)


@pytest.mark.parametrize("backend", [runnable("torch"), runnable("cpu")])
def test_opcheck_custom_op_with_affine(backend, rng):
    image, landmarks, affine = random_views(rng, views=2, landmarks=3, size=(9, 8))
    torch.library.opcheck(
        patch_gather_op, (image.requires_grad_(), landmarks.requires_grad_(), 4, backend, False, affine)
    )


def test_torch_compile_fullgraph_with_affine(rng):
    image, landmarks, affine = random_views(rng, views=2, landmarks=4)
    index = torch.tensor([[0, 3, 3], [2, 1, 0], [1, 1, 2], [3, 0, 1]])

    def tokens_of(im, lm, a):
        return landmark_patch_gather(im, lm, 4, index=index, view_affine=a)

    torch._dynamo.reset()
    compiled = torch.compile(tokens_of, fullgraph=True, backend="aot_eager")
    grad_tokens = torch.randn(4, 3, 48, generator=rng)
    expected = run_backend(image, landmarks, affine, 4, grad_tokens, None, index=index)
    im, lm = image.clone().requires_grad_(), landmarks.clone().requires_grad_()
    out = compiled(im, lm, affine)
    out.backward(grad_tokens)
    assert_close(out, expected[0])
    assert_close(im.grad, expected[1])
    assert_close(lm.grad, expected[2])


# --------------------------------------------------------------------------- GPU (skipped without a CUDA device)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_affine_matches_reference(backend, deterministic, rng):
    if backend == "triton" and deterministic:
        pytest.skip("triton has no deterministic image gradient")
    image, landmarks, affine = random_views(rng, batch=4, views=3, size=(40, 36), landmarks=30)
    index = torch.randint(0, 30, (12, 50), generator=rng)
    grad_tokens = torch.randn(12, 50, 192, generator=rng, dtype=torch.float64)
    ref = affine_reference(image, landmarks, affine, 8, grad_tokens, index)
    got = run_backend(
        image.cuda(),
        landmarks.cuda(),
        affine.cuda(),
        8,
        grad_tokens.cuda(),
        backend,
        index=index.cuda(),
        deterministic=deterministic,
    )
    position = 1.0 if backend != "triton" else 1.0 + steepest_slope(image)
    assert_close(got[0], ref[0], scale=position)
    assert_close(got[1], ref[1], scale=4 * 3 * position)
    assert_close(got[2], ref[2], scale=8 * 8 * 3 * 2 * position)


@pytest.mark.gpu
def test_cuda_deterministic_affine_image_gradient_is_bitwise_repeatable(rng):
    image, landmarks, affine = random_views(rng, batch=8, views=4, size=(112, 112), landmarks=196)
    affine[:, 2:] *= 8  # offsets across the whole 112 x 112 image
    index = torch.randint(0, 196, (32, 100), generator=rng).cuda()
    grad_tokens = torch.randn(32, 100, 192, generator=rng).cuda()
    args = (image.cuda(), landmarks.cuda(), affine.cuda(), 8, grad_tokens, "cuda")
    first = run_backend(*args, index=index, deterministic=True)[1]
    for _ in range(3):
        assert torch.equal(run_backend(*args, index=index, deterministic=True)[1], first)
    assert_close(run_backend(*args, index=index, deterministic=False)[1], first, scale=4)
    cpu = run_backend(image, landmarks, affine, 8, grad_tokens.cpu(), "cpu", index=index.cpu())
    assert_close(first, cpu[1], scale=4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_launches_on_the_input_device_not_the_current_one(backend, rng):
    image, landmarks, affine = random_views(rng, views=2, landmarks=5)
    grad_tokens = torch.randn(4, 5, 192, generator=rng)
    expected = run_backend(image, landmarks, affine, 8, grad_tokens, "cpu")
    with torch.cuda.device(0):
        got = run_backend(
            image.to("cuda:1"), landmarks.to("cuda:1"), affine.to("cuda:1"), 8, grad_tokens.to("cuda:1"), backend
        )
    for ours, theirs in zip(got, expected):
        assert ours.device == torch.device("cuda:1")
        assert_close(ours, theirs, scale=8 * 8 * 3)
