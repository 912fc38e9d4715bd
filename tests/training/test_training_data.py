"""Training data: cached volumes, slice index, lesion-aware sampler, 2.5D dataset, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medseg.config import AugmentConfig, Config, PreprocessConfig
from medseg.data import (
    LesionAwareSampler,
    RandLesionCropd,
    RandModalityIntensityd,
    SliceDataset,
    SliceIndex,
    TrainVolume,
    fingerprint,
    load_volume,
    load_volumes,
    train_transforms,
)
from medseg.manifest import read_manifest
from medseg.transforms.preprocessing import IMAGE_KEY, channel_key, context_stack, preprocess_transforms


@pytest.fixture(scope="module")
def cases(phantom_manifest):
    torch.set_num_threads(1)
    return read_manifest(phantom_manifest(3, (48, 44, 16), seed=3, val_fraction=0.34, test_fraction=0))


def toy_volume(case_id: str = "toy", n_slices: int = 6, lesion_slices=(2, 3)) -> TrainVolume:
    """(2, S, 20, 24) image whose channel 0 is 10 on the lesion and 0 elsewhere."""
    label = torch.zeros(n_slices, 20, 24, dtype=torch.uint8)
    for s in lesion_slices:
        label[s, 4:12, 6:15] = 1
    image = torch.stack([label.float() * 10.0, torch.arange(n_slices).float()[:, None, None].expand(-1, 20, 24)])
    return TrainVolume(case_id, image.contiguous(), label, (3.0, 1.0, 1.0))


def test_volume_is_the_preprocessed_volume_slice_major(cases):
    cfg = Config()
    case = cases[0]
    volume = load_volume(case, cfg.preprocess, cfg.data.labels)
    chain = preprocess_transforms(cfg.preprocess, case.modality, case.channels, with_label=False)
    ref = chain({channel_key(c): str(p) for c, p in case.images.items()})[IMAGE_KEY].as_tensor()  # (C, R, A, S)
    assert volume.image.shape == (ref.shape[0], ref.shape[3], ref.shape[1], ref.shape[2])
    for s in (0, 5, ref.shape[3] - 1):  # image[:, s] stacks exactly what inference stacks
        torch.testing.assert_close(context_stack(volume.image, s, 1, axis=1), context_stack(ref, s, 1, axis=-1))
    assert volume.label.dtype == torch.uint8 and volume.label.shape == volume.image.shape[1:]
    assert set(volume.label.unique().tolist()) == {0, 1}


def test_cache_hits_and_fingerprint(cases, tmp_path, monkeypatch):
    cfg = Config()
    first = load_volume(cases[0], cfg.preprocess, cfg.data.labels, tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("cache miss: the volume was preprocessed again")

    monkeypatch.setattr("medseg.data.volumes.preprocess_case", fail)
    again = load_volume(cases[0], cfg.preprocess, cfg.data.labels, tmp_path)
    torch.testing.assert_close(again.image, first.image)
    assert again.spacing == first.spacing
    base = fingerprint(cases[0], cfg.preprocess, cfg.data.labels)
    # the number of context slices is chosen at sampling time: same volume, same entry
    assert fingerprint(cases[0], PreprocessConfig(context_slices=3), cfg.data.labels) == base
    assert fingerprint(cases[0], PreprocessConfig(crop_margin=2), cfg.data.labels) != base
    assert fingerprint(cases[1], cfg.preprocess, cfg.data.labels) != base


def test_corrupt_cache_entry_is_rebuilt(cases, tmp_path):
    cfg = Config()
    load_volume(cases[0], cfg.preprocess, cfg.data.labels, tmp_path)
    (entry,) = tmp_path.glob("*.pt")
    entry.write_bytes(b"not a torch file")
    volume = load_volume(cases[0], cfg.preprocess, cfg.data.labels, tmp_path)
    assert volume.image.ndim == 4
    assert torch.load(entry, weights_only=True)["case_id"] == cases[0].case_id


def test_slice_index_counts_lesion_voxels():
    index = SliceIndex.from_volumes([toy_volume("a"), toy_volume("b", 4, (0,))])
    assert len(index) == 10
    assert index.case.tolist() == [0] * 6 + [1] * 4
    assert index.lesion.tolist() == [False, False, True, True, False, False, True, False, False, False]
    assert index.lesion_voxels[2] == 8 * 9


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_sampler_puts_the_lesion_share_in_every_batch(fraction):
    lesion = np.zeros(50, dtype=bool)
    lesion[[3, 7, 20, 21, 40]] = True
    sampler = LesionAwareSampler(lesion, batch_size=8, num_batches=6, lesion_fraction=fraction, seed=1)
    positions, seeds = sampler.plan()
    assert positions.shape == seeds.shape == (6, 8)
    per_batch = lesion[positions].sum(axis=1)
    assert (per_batch == round(8 * fraction)).all()
    assert len(list(sampler)) == len(sampler) == 48


def test_sampler_is_deterministic_per_epoch_and_shards_ranks():
    lesion = np.arange(40) % 3 == 0
    a = LesionAwareSampler(lesion, 4, 5, 0.5, seed=7)
    b = LesionAwareSampler(lesion, 4, 5, 0.5, seed=7)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.load_state_dict(b.state_dict())
    assert list(a) == list(b)
    # two ranks take alternate batches of the single-rank plan of twice the batches
    whole = LesionAwareSampler(lesion, 4, 10, 0.5, seed=7).plan()[0]
    r0 = LesionAwareSampler(lesion, 4, 5, 0.5, seed=7, rank=0, world_size=2).plan()[0]
    r1 = LesionAwareSampler(lesion, 4, 5, 0.5, seed=7, rank=1, world_size=2).plan()[0]
    np.testing.assert_array_equal(r0, whole[0::2])
    np.testing.assert_array_equal(r1, whole[1::2])


def test_sampler_covers_a_pool_before_repeating():
    lesion = np.zeros(30, dtype=bool)
    lesion[:6] = True
    positions, _ = LesionAwareSampler(lesion, 6, 2, 0.5, seed=0).plan()
    drawn = positions[lesion[positions]]
    assert sorted(drawn.tolist()) == list(range(6))  # 6 lesion draws = one permutation of the pool


def test_dataset_sample_is_a_context_stack_with_its_label():
    volume = toy_volume()
    dataset = SliceDataset([volume], SliceIndex.from_volumes([volume]), context=1)
    sample = dataset[0]  # slice 0: the lower neighbour is replicated
    assert sample["image"].shape == (6, 20, 24) and sample["label"].shape == (1, 20, 24)
    # neighbour-major channel order: (z-1: c0, c1), (z: c0, c1), (z+1: c0, c1)
    assert sample["image"][[1, 3, 5], 0, 0].tolist() == [0.0, 0.0, 1.0]
    assert sample["label"].dtype == torch.float32


def test_augmentation_is_seeded_and_moves_image_and_label_together():
    torch.set_num_threads(1)
    volume = toy_volume(n_slices=4, lesion_slices=(0, 1, 2, 3))
    aug = AugmentConfig(intensity_prob=0, contrast_prob=0, noise_prob=0, blur_prob=0, affine_prob=1.0, elastic_prob=1.0)
    dataset = SliceDataset([volume], SliceIndex.from_volumes([volume]), 0, train_transforms(aug, (24, 28), 1.0))
    a, b, c = dataset[(1, 11)], dataset[(1, 11)], dataset[(1, 12)]
    assert a["image"].shape == (2, 24, 28) and a["label"].shape == (1, 24, 28)
    torch.testing.assert_close(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    for sample in (a, c):
        assert set(sample["label"].unique().tolist()) <= {0.0, 1.0}
        agree = ((sample["image"][0] > 5) == (sample["label"][0] > 0.5)).float().mean()
        assert agree > 0.97  # same geometric transform (bilinear vs nearest differ on the border only)


def test_intensity_augmentation_leaves_the_label_alone():
    volume = toy_volume(lesion_slices=(2,))
    aug = AugmentConfig(flip_prob=0, affine_prob=0, elastic_prob=0, translate=0, intensity_prob=1, contrast_prob=1, noise_prob=1)
    dataset = SliceDataset([volume], SliceIndex.from_volumes([volume]), 0, train_transforms(aug, (20, 24), 0.0))
    sample = dataset[(2, 5)]
    torch.testing.assert_close(sample["label"][0], volume.label[2].float())
    assert not torch.allclose(sample["image"][0], volume.image[0, 2])


def test_lesion_crop_keeps_the_lesion_in_the_patch():
    volume = toy_volume(lesion_slices=(2,))
    dataset = SliceDataset(
        [volume], SliceIndex.from_volumes([volume]), 0, train_transforms(AugmentConfig(enabled=False), (8, 8), 1.0)
    )
    for seed in range(10):
        assert dataset[(2, seed)]["label"].sum() > 0


def test_samples_do_not_depend_on_the_number_of_workers(cases):
    cfg = Config()
    volumes = load_volumes(cases[:2], cfg.preprocess, cfg.data.labels)
    index = SliceIndex.from_volumes(volumes)
    dataset = SliceDataset(volumes, index, 1, train_transforms(cfg.train.augment, (48, 48), 0.9))
    batches = []
    for workers in (0, 2):
        sampler = LesionAwareSampler(index.lesion, 4, 3, 0.5, seed=2)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
        batches.append([b["image"] for b in loader])
    for x, y in zip(*batches, strict=True):
        torch.testing.assert_close(x, y)


def test_modality_intensity_is_shared_by_the_context_slices_of_a_modality():
    x = torch.ones(6, 4, 4) * torch.arange(1, 7, dtype=torch.float32)[:, None, None]  # 3 slices x 2 modalities
    transform = RandModalityIntensityd("image", n_modalities=2, scale=0.3, shift=0.5, prob=1.0)
    transform.set_random_state(4)
    y = transform({"image": x})["image"]
    # channel i = slice i // 2, modality i % 2: y = x * f[m] + o[m]
    for m in (0, 1):
        ch = [m, m + 2, m + 4]
        f = (y[ch[1], 0, 0] - y[ch[0], 0, 0]) / (x[ch[1], 0, 0] - x[ch[0], 0, 0])
        o = y[ch[0], 0, 0] - x[ch[0], 0, 0] * f
        torch.testing.assert_close(y[ch], x[ch] * f + o)
        assert 0.7 <= float(f) <= 1.3 and abs(float(o)) <= 0.5
    f0 = (y[2] - y[0]) / 2
    f1 = (y[3] - y[1]) / 2
    assert not torch.allclose(f0, f1)  # the modalities drew their own factors
    with pytest.raises(ValueError, match="multiple"):
        RandModalityIntensityd("image", 4, 0.1, 0.1, 1.0)({"image": x})


def test_crop_margin_places_the_slice_at_every_offset_with_replicated_image_and_empty_label():
    h, w = 10, 12
    image = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    label = torch.ones(1, h, w)
    crop = RandLesionCropd(["image", "label"], "label", (h, w), 0.0, margin=(3, 4), pad_modes=("replicate", "constant"))
    corners = set()
    for seed in range(200):
        crop.set_random_state(seed)
        out = crop({"image": image, "label": label})
        top, left = _corner(out["image"], image)
        corners.add((top, left))
        assert out["image"].shape == (1, h, w) and out["label"].shape == (1, h, w)
        # the label is 1 exactly where the crop lies inside the slice, 0 in the margin
        rows = torch.arange(h) + top
        cols = torch.arange(w) + left
        inside = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        torch.testing.assert_close(out["label"][0], inside.float())
        # the image is the slice's edge-replicated extension
        expected = image[0][rows.clamp(0, h - 1)][:, cols.clamp(0, w - 1)]
        torch.testing.assert_close(out["image"][0], expected)
    tops, lefts = {c[0] for c in corners}, {c[1] for c in corners}
    assert tops == set(range(-3, 4)) and lefts == set(range(-4, 5))


def _corner(patch: torch.Tensor, image: torch.Tensor) -> tuple[int, int]:
    """Top-left corner of ``patch`` in ``image`` coordinates (image values are row * w + col)."""
    w = image.shape[-1]
    # the central pixel of the patch lies inside the slice for margins under half the patch
    ph, pw = patch.shape[-2:]
    value = int(patch[0, ph // 2, pw // 2])
    return value // w - ph // 2, value % w - pw // 2


def test_translate_sets_the_training_crop_margin():
    from medseg.transforms.augment import crop_margin

    assert crop_margin(AugmentConfig(translate=0.25), (160, 192)) == (40, 48)
    assert crop_margin(AugmentConfig(translate=0.25, enabled=False), (160, 192)) == (0, 0)


def test_instance_labels_per_slice(tmp_path, phantom_manifest):
    """Instance models train on per-slice lesion ids: ``values`` keeps touching lesions apart
    (an instance-labelled reference), ``components`` merges them; the cache tells the two apart."""
    from medseg.config import LabelConfig
    from medseg.data.volumes import slice_instances

    manifest = phantom_manifest(1, (48, 48, 12), seed=2, val_fraction=0, test_fraction=0, touching_pairs=1,
                                instance_labels=True)
    case = read_manifest(manifest)[0]
    preprocess = PreprocessConfig()
    values, components = LabelConfig(instances="values"), LabelConfig(instances="components")
    by_value = load_volume(case, preprocess, values, tmp_path / "cache", instances=True)
    by_component = load_volume(case, preprocess, components, tmp_path / "cache", instances=True)
    mask = load_volume(case, preprocess, values, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    assert by_value.instances and not mask.instances
    assert torch.equal(by_value.label > 0, mask.label > 0) and torch.equal(by_component.label > 0, mask.label > 0)
    per_slice = [(int(v.max()), int(c.max())) for v, c in zip(by_value.label, by_component.label, strict=True)]
    assert any(v == c + 1 for v, c in per_slice), per_slice  # a slice where the touching pair is one component
    # the index counts lesion slices from the ids as from the mask
    assert np.array_equal(SliceIndex.from_volumes([by_value]).lesion, SliceIndex.from_volumes([mask]).lesion)

    plane = np.zeros((2, 6, 6), dtype=np.int32)
    plane[0, 1:3, 1:3], plane[0, 3:5, 1:3] = 7, 9
    assert slice_instances(plane, values=True, where="x")[0].max() == 2
    assert slice_instances(plane > 0, values=False, where="x")[0].max() == 1
    crowded = np.zeros((1, 40, 40), dtype=np.int32)
    crowded[0, ::2, ::2] = 1  # 400 isolated pixels
    with pytest.raises(Exception, match="at most 255"):
        slice_instances(crowded, values=False, where="case x")
