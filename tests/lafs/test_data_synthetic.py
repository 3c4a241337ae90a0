"""SyntheticFaces: contract, determinism, landmarks, and that verification is not trivial."""

import numpy as np
import pytest
import torch
from torch import nn

from lafs.data import SyntheticFaces, verification_pairs

ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def seed_from(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def best_threshold_accuracy(similarity: np.ndarray, issame: np.ndarray) -> float:
    """Accuracy of the best single threshold on the similarity (an optimistic, in-sample figure)."""
    return max(((similarity >= t) == issame).mean() for t in np.unique(similarity))


def pair_similarity(embeddings: torch.Tensor) -> np.ndarray:
    embeddings = nn.functional.normalize(embeddings.flatten(1), dim=1)
    return (embeddings[0::2] * embeddings[1::2]).sum(1).numpy()


def test_contract_and_labels(rng):
    faces = SyntheticFaces(3, 4, seed=seed_from(rng))
    assert len(faces) == 12 and faces.num_classes == 3
    assert faces.labels.dtype == np.int64
    np.testing.assert_array_equal(faces.labels, np.repeat(np.arange(3), 4))
    image, label = faces[7]
    assert image.dtype == torch.float32 and image.shape == (3, 112, 112) and label == 1
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    rgb, label, points = faces.render(7)
    assert rgb.dtype == np.uint8 and rgb.shape == (112, 112, 3) and label == 1
    assert points.dtype == np.float32 and points.shape == (5, 2)
    torch.testing.assert_close(image, (torch.from_numpy(rgb).permute(2, 0, 1).float() - 127.5) / 127.5)
    with pytest.raises(IndexError):
        faces[12]
    with pytest.raises(ValueError, match="difficulty"):
        SyntheticFaces(2, 2, difficulty=-1.0)


def test_deterministic_from_seed_and_offsets_give_other_identities(rng):
    seed = seed_from(rng)
    first, again = SyntheticFaces(4, 3, seed=seed), SyntheticFaces(4, 3, seed=seed, cache=True)
    for index in (0, 5, 11, 5):
        a, b = first.render(index), again.render(index)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[2], b[2])
    other_seed = SyntheticFaces(4, 3, seed=seed + 1).render(5)[0]
    assert np.abs(other_seed.astype(int) - first.render(5)[0]).mean() > 5
    # identity_offset=2 starts at the third identity of the same seed
    shifted = SyntheticFaces(2, 3, seed=seed, identity_offset=2)
    np.testing.assert_array_equal(shifted.render(1)[0], first.render(2 * 3 + 1)[0])
    assert shifted.render(1)[1] == 0
    # images of one identity differ (nuisances), and difficulty 0 removes the pose nuisance
    assert np.abs(first.render(0)[0].astype(int) - first.render(1)[0]).mean() > 5
    still = SyntheticFaces(1, 3, seed=seed, difficulty=0.0)
    np.testing.assert_allclose(still.render(0)[2], still.render(2)[2], atol=1e-4)


def test_five_points_follow_the_arcface_layout_and_the_drawn_eyes(rng):
    faces = SyntheticFaces(6, 4, seed=seed_from(rng))
    points = np.stack([faces.render(i)[2] for i in range(len(faces))])
    # roughly aligned like insightface crops: mean points within a few pixels of the ArcFace template
    assert np.abs(points.mean(0) - ARCFACE_TEMPLATE).max() < 6.0
    assert (points[:, 0, 0] < points[:, 1, 0]).all() and (points[:, 3, 0] < points[:, 4, 0]).all()
    assert (points[:, :2, 1].max(1) < points[:, 2, 1]).all() and (points[:, 2, 1] < points[:, 3:, 1].min(1)).all()
    # the eye points sit on dark pupils: darker than the 11 x 11 neighbourhood around them (not than the whole
    # face, which lighting and skin tone can make darker still: 5 of 300 face sets failed that)
    for index in range(len(faces)):
        rgb, _, marks = faces.render(index)
        gray = rgb.mean(2)
        for x, y in marks[:2]:
            cx, cy = int(round(x)), int(round(y))
            assert gray[cy - 1 : cy + 2, cx - 1 : cx + 2].min() < gray[cy - 5 : cy + 6, cx - 5 : cx + 6].mean()


def test_verification_pairs_are_balanced_and_labelled_correctly(rng):
    faces = SyntheticFaces(5, 3, seed=seed_from(rng))
    faces_by_image = {tuple(faces[i][0][:, 50, 40:48].flatten().tolist()): faces.labels[i] for i in range(len(faces))}
    images, issame = verification_pairs(faces, 20, seed=seed_from(rng))
    assert images.shape == (40, 3, 112, 112) and images.dtype == torch.float32
    assert issame.dtype == bool and issame.shape == (20,) and issame.sum() == 10
    labels = np.array([faces_by_image[tuple(image[:, 50, 40:48].flatten().tolist())] for image in images])
    np.testing.assert_array_equal(labels[0::2] == labels[1::2], issame)
    assert not any(torch.equal(images[2 * i], images[2 * i + 1]) for i in range(20))
    assert not (issame[:10].all() and not issame[10:].any())  # pair order is shuffled
    with pytest.raises(ValueError, match="at least two"):
        verification_pairs(SyntheticFaces(1, 1), 4)


def test_held_out_val_set_embeds_each_image_once_in_the_pairs_of_verification_pairs():
    """The training loop's held-out set: distinct images + pair_index, the same pairs as verification_pairs."""
    from lafs.train import config as cfgmod
    from lafs.train.data import build_val_sets

    tree = cfgmod.demo_stage_tree(cfgmod.load_recipe("tiny"), "supervised")
    cfg = cfgmod.resolve_stage("supervised", tree)
    (val_set,) = build_val_sets(cfg)
    held_out = SyntheticFaces(
        cfg.val.synthetic_identities,
        cfg.val.synthetic_images_per_identity,
        seed=cfg.seed,
        identity_offset=cfg.data.synthetic.identities,
        difficulty=cfg.data.synthetic.difficulty,
    )
    images, issame = verification_pairs(held_out, cfg.val.pairs, seed=cfg.seed)
    np.testing.assert_array_equal(val_set.issame, issame)
    assert torch.equal(val_set.images[val_set.pair_index], images)
    assert len(val_set.images) == len(np.unique(val_set.pair_index)) <= len(held_out)


def test_val_set_pictures_sample_the_whole_set():
    """The landmark pictures take images spread over the set, not the first identity's."""
    from lafs.train.data import ValSet

    images = torch.arange(40.0).view(40, 1, 1, 1).expand(40, 3, 4, 4)
    picked = ValSet("s", images, np.zeros(20, bool)).sample_images(8)[:, 0, 0, 0].tolist()
    assert picked == [0, 5, 10, 15, 20, 25, 30, 35]
    assert len(ValSet("s", images[:5], np.zeros(2, bool)).sample_images(8)) == 5


def _demo_difficulty() -> float:
    from lafs.train import config as cfgmod

    return float(cfgmod.load_recipe("demo")["data"]["synthetic"]["difficulty"])


@pytest.mark.parametrize("difficulty", [1.0, "demo"])
def test_neither_raw_pixels_nor_an_untrained_network_verify(rng, difficulty):
    """At the default strength and at the demo recipe's, with the default per-image colours (the demo's
    per-identity colours give untrained features a little more: its recipe has the numbers)."""
    difficulty = _demo_difficulty() if difficulty == "demo" else difficulty
    faces = SyntheticFaces(40, 6, seed=seed_from(rng), identity_offset=5000, difficulty=difficulty)
    images, issame = verification_pairs(faces, 200, seed=seed_from(rng))
    centred = images.flatten(1) - images.flatten(1).mean(1, keepdim=True)
    pixel_accuracy = best_threshold_accuracy(pair_similarity(centred), issame)
    assert pixel_accuracy < 0.75, f"pixel cosine similarity verifies {pixel_accuracy:.3f} of the pairs"
    network = nn.Sequential(  # default initialisation, seeded by the rng fixture
        nn.Conv2d(3, 16, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, 2, 1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(1024, 128),
    )
    with torch.no_grad():
        network_accuracy = best_threshold_accuracy(pair_similarity(network(images)), issame)
    assert network_accuracy < 0.65, f"a random CNN verifies {network_accuracy:.3f} of the pairs"


def test_difficulty_curriculum_scales_each_images_own_nuisances(rng):
    seed = int(torch.randint(0, 1000, (1,), generator=rng))
    ramp = SyntheticFaces(3, 4, seed=seed, difficulty=0.8, difficulty_warmup_epochs=4, cache=True)
    plain = SyntheticFaces(3, 4, seed=seed, difficulty=0.8)
    clean = SyntheticFaces(3, 4, seed=seed, difficulty=0.0)
    half = SyntheticFaces(3, 4, seed=seed, difficulty=0.4)
    assert [ramp.difficulty_at(e) for e in (0, 1, 2, 4, 9)] == pytest.approx([0.0, 0.2, 0.4, 0.8, 0.8])
    i = int(torch.randint(0, len(ramp), (1,), generator=rng))
    # epoch 0: the clean face of the same draw; epoch 2: half strength; from epoch 4 on: the data set's images
    assert torch.equal(ramp.item_at(i, 0)[0], clean[i][0])
    assert torch.equal(ramp.item_at(i, 2)[0], half[i][0])
    assert torch.equal(ramp.item_at(i, 7)[0], plain[i][0])
    assert not torch.equal(ramp.item_at(i, 0)[0], plain[i][0])
    # the cache holds one difficulty per image and never serves the wrong one
    assert torch.equal(ramp.item_at(i, 0)[0], clean[i][0]) and torch.equal(ramp[i][0], plain[i][0])
    assert ramp.item_at(i, 3)[1] == plain[i][1]


def test_training_items_follow_the_curriculum_through_few_shot_subsets(rng):
    from lafs.data import few_shot_subset
    from lafs.train.loop import SeededItems

    ramp = SyntheticFaces(4, 3, seed=1, difficulty=0.6, difficulty_warmup_epochs=2)
    clean = SyntheticFaces(4, 3, seed=1, difficulty=0.0)
    subset = few_shot_subset(ramp, images_per_identity=2, seed=int(torch.randint(0, 100, (1,), generator=rng)))
    items = SeededItems(subset, seed=0)
    k = int(torch.randint(0, len(subset), (1,), generator=rng))
    parent = int(subset.indices[k])
    assert torch.equal(items[(k, 0)][0], clean[parent][0])
    assert torch.equal(items[(k, 5)][0], ramp[parent][0])
    assert items[(k, 0)][1] == subset[k][1]
    with pytest.raises(ValueError, match="difficulty_warmup_epochs"):
        SyntheticFaces(2, 2, difficulty_warmup_epochs=-1.0)


@pytest.mark.parametrize("seed", [0, 20261207, 2**63 - 1])
def test_seeded_items_take_any_configurable_seed(seed):
    """Each item's transform is seeded from (seed, epoch, index); a date-like seed overflowed torch.manual_seed.
    Where the seed fits (small seeds), it is exactly the one it always was, so earlier runs repeat."""
    from lafs.train.loop import SeededItems

    faces = SyntheticFaces(2, 2, seed=1, difficulty=0.0)

    def draw(image):
        return image + torch.rand(())

    items = SeededItems(faces, seed=seed, transform=draw)
    first, again = items[(3, 1)][0], items[(3, 1)][0]
    assert torch.equal(first, again) and not torch.equal(first, items[(3, 2)][0])
    if seed == 0:
        torch.manual_seed((0 * 1_000_003 + 1) * 10_000_019 + 3)
        assert torch.equal(first, faces[3][0] + torch.rand(()))


def _cheek_colour(faces: SyntheticFaces, index: int) -> np.ndarray:
    """Mean RGB of a patch between the left eye and the left mouth corner (skin in every image)."""
    rgb, _, points = faces.render(index)
    x, y = (points[0] + points[3]) / 2 + np.array([-4.0, 0.0])
    return rgb[int(y) - 2 : int(y) + 3, int(x) - 2 : int(x) + 3].reshape(-1, 3).mean(0)


def test_per_identity_colours_keep_each_identitys_skin_and_change_nothing_else(rng):
    seed = seed_from(rng)
    per_image = SyntheticFaces(16, 4, seed=seed, difficulty=0.2)
    per_identity = SyntheticFaces(16, 4, seed=seed, difficulty=0.2, colours="per_identity")
    assert per_image.colours == "per_image"  # the default
    for index in (0, 9, 63):  # same pose, expression and landmarks in both modes
        np.testing.assert_array_equal(per_image.render(index)[2], per_identity.render(index)[2])
    for faces, keeps_skin in ((per_identity, True), (per_image, False)):
        colours = np.stack([_cheek_colour(faces, i) for i in range(len(faces))]).reshape(16, 4, 3)
        within = colours.std(axis=1).mean()  # spread over one identity's images
        between = colours.mean(axis=1).std(axis=0).mean()  # spread of the identities' means
        # measured over 20 seeds: within / between 0.13-0.27 per identity, 1.1-2.1 per image
        if keeps_skin:
            assert within < 0.4 * between, (within, between)
        else:
            assert within > 0.8 * between, (within, between)
    with pytest.raises(ValueError, match="colours"):
        SyntheticFaces(2, 2, colours="per_face")


def test_pose_difficulty_scales_the_pose_alone(rng):
    seed = seed_from(rng) % 10_000
    i = int(torch.randint(0, 6, (1,), generator=rng))
    plain = SyntheticFaces(2, 3, seed=seed, difficulty=0.3)
    same = SyntheticFaces(2, 3, seed=seed, difficulty=0.3, pose_difficulty=0.3)
    wide = SyntheticFaces(2, 3, seed=seed, difficulty=0.3, pose_difficulty=1.5, cache=True)
    both = SyntheticFaces(2, 3, seed=seed, difficulty=1.5)
    np.testing.assert_array_equal(plain.render(i)[0], same.render(i)[0])
    # eyes and nose tip depend on pose (and the identity) only (the mouth corners on the expression too):
    # wide pose at difficulty 0.3 puts them where difficulty 1.5 does, with the lighting, blur and noise of 0.3
    np.testing.assert_allclose(wide.render(i)[2][:3], both.render(i)[2][:3], atol=1e-4)
    assert not np.allclose(wide.render(i)[2], plain.render(i)[2], atol=0.05)
    assert not np.array_equal(wide.render(i)[0], both.render(i)[0])
    # render() can ask for another pose strength; the cache keeps one (difficulty, pose) per image
    np.testing.assert_array_equal(wide.render(i, difficulty=0.3, pose_difficulty=0.3)[0], plain.render(i)[0])
    np.testing.assert_allclose(wide.render(i)[2][:3], both.render(i)[2][:3], atol=1e-4)
    # the curriculum ramps the pose with the other nuisances
    ramp = SyntheticFaces(2, 3, seed=seed, difficulty=0.3, pose_difficulty=1.5, difficulty_warmup_epochs=2)
    half = SyntheticFaces(2, 3, seed=seed, difficulty=0.15, pose_difficulty=0.75)
    assert torch.equal(ramp.item_at(i, 1)[0], half[i][0])
    with pytest.raises(ValueError, match="pose_difficulty"):
        SyntheticFaces(2, 2, pose_difficulty=-0.5)
