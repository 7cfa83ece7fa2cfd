"""Each augmentation op on known inputs, and per-sample randomness across a batch."""

from __future__ import annotations

import math

import pytest
import torch

from hpsearch.augment import (
    GRAY_WEIGHTS,
    LEVELS,
    augment,
    crop_matrix,
    elastic_displacement,
    gaussian_blur,
    homography,
    perspective_matrix,
    random_crop,
    random_grayscale,
    rotate,
    shear_scale_matrix,
    warp,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ramp(b: int = 8, c: int = 3, h: int = 8, w: int = 8) -> torch.Tensor:
    """Every pixel of every sample distinct (values 1..), so a moved pixel is traceable."""
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).view(b, c, h, w)


def identity(b: int) -> torch.Tensor:
    return torch.eye(3).expand(b, 3, 3)


# ---------------------------------------------------------------- crop and flip (exact)


def test_crop_keeps_shape_and_dtype_and_each_output_is_a_window_of_the_padded_image() -> None:
    x = ramp(32)
    out = random_crop(x, padding=2, generator=gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])]
        assert len(hits) == 1, f"sample {i} is not exactly one window of its padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 5  # offsets are drawn per sample
    assert any(o != (2, 2) for o in offsets)  # content moves


def test_crop_works_on_uint8_and_pads_with_zeros() -> None:
    x = torch.full((64, 1, 6, 6), 200, dtype=torch.uint8)
    out = random_crop(x, padding=4, generator=gen())
    assert out.dtype == torch.uint8
    assert (out == 0).any() and (out == 200).any()
    assert set(out.unique().tolist()) == {0, 200}


def test_flip_is_exact_and_per_sample() -> None:
    x = ramp(64)
    out = random_crop(x, padding=0, flip=True, generator=gen())
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    unchanged = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or u for f, u in zip(flipped, unchanged, strict=True))
    assert 10 < sum(flipped) < 54  # p = 0.5 per sample


def test_crop_without_flip_never_mirrors() -> None:
    x = ramp(64)
    out = random_crop(x, padding=0, generator=gen())
    assert torch.equal(out, x)


def test_base_level_is_crop_and_flip_and_same_seed_same_batch() -> None:
    x = ramp(16, h=32, w=32)
    a = augment(x, "base", flip=True, generator=gen(3))
    b = augment(x, "base", flip=True, generator=gen(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, x)


# ---------------------------------------------------------------- the sampling grid


def test_warp_with_identity_matrix_is_identity() -> None:
    x = ramp(4, h=7, w=9)
    assert torch.allclose(warp(x, identity(4)), x, atol=1e-3)


def test_rotation_by_zero_is_identity() -> None:
    x = ramp(4, h=32, w=32)
    assert torch.allclose(rotate(x, torch.zeros(4)), x, atol=1e-3)


def test_rotation_by_90_turns_the_top_right_pixel_to_the_top_left() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 4] = 1.0
    out = rotate(x, torch.tensor([90.0]))
    expected = torch.zeros(1, 1, 5, 5)
    expected[0, 0, 0, 0] = 1.0  # counter-clockwise on screen
    assert torch.allclose(out, expected, atol=1e-5)


def test_rotation_angles_are_per_sample() -> None:
    x = ramp(1, h=16, w=16).expand(3, 3, 16, 16)
    out = rotate(x, torch.tensor([0.0, 10.0, -10.0]))
    assert torch.allclose(out[0], x[0], atol=1e-3)
    assert not torch.allclose(out[1], out[2])


def test_crop_matrix_shifts_by_whole_pixels_exactly() -> None:
    x = ramp(32, h=8, w=8)
    m = crop_matrix(32, padding=2, device=x.device, generator=gen())
    out = warp(x, m)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        tx, ty = int(m[i, 0, 2]), int(m[i, 1, 2])
        assert torch.allclose(out[i], padded[i, :, 2 + ty : 2 + ty + 8, 2 + tx : 2 + tx + 8], atol=1e-3)
    assert len({(float(m[i, 0, 2]), float(m[i, 1, 2])) for i in range(32)}) > 5


def test_homography_maps_the_given_points() -> None:
    src = torch.tensor([[[-3.0, -2.0], [4.0, -1.0], [3.0, 3.0], [-2.0, 4.0]]])
    dst = torch.tensor([[[-4.0, -4.0], [4.0, -4.0], [4.0, 4.0], [-4.0, 4.0]]])
    h = homography(src, dst)
    points = torch.cat([src, torch.ones(1, 4, 1)], dim=-1) @ h.transpose(1, 2)
    assert torch.allclose(points[..., :2] / points[..., 2:], dst, atol=1e-4)


def test_perspective_with_zero_distortion_or_zero_probability_is_identity() -> None:
    for kwargs in ({"distortion": 0.0, "p": 1.0}, {"distortion": 0.5, "p": 0.0}):
        m = perspective_matrix(8, 32, 32, device=torch.device("cpu"), generator=gen(), **kwargs)
        assert torch.allclose(m, identity(8), atol=1e-5)


def test_perspective_moves_the_corners_inwards_per_sample() -> None:
    m = perspective_matrix(16, 32, 32, distortion=0.5, p=1.0, device=torch.device("cpu"), generator=gen())
    assert len({tuple(m[i].flatten().round(decimals=4).tolist()) for i in range(16)}) == 16
    # On an image of ones, the centre still reads inside the image; a corner moved inwards reads outside (zero).
    out = warp(torch.ones(16, 1, 32, 32), m)
    assert torch.all(out[:, :, 16, 16] > 0.99)  # the centre stays inside
    assert (out[:, 0, 0, 0] < 0.5).float().mean() > 0.5  # most corners moved inwards: zero fill


def test_shear_and_scale_identity_zoom_in_and_zoom_out() -> None:
    ones = torch.ones(2, 3, 16, 16)
    assert torch.allclose(shear_scale_matrix(torch.zeros(2), torch.ones(2)), identity(2))
    zoom_in = warp(ones, shear_scale_matrix(torch.zeros(2), torch.full((2,), 1.2)))
    assert torch.allclose(zoom_in, ones, atol=1e-4)  # samples only inside: stays constant
    zoom_out = warp(ones, shear_scale_matrix(torch.zeros(2), torch.full((2,), 0.8)))
    assert torch.all(zoom_out[..., 0, :] < 0.5) and torch.allclose(zoom_out[..., 8, 8], torch.ones(2, 3))
    sheared = warp(ramp(1, h=16, w=16), shear_scale_matrix(torch.tensor([10.0]), torch.ones(1)))
    assert torch.allclose(sheared[..., 7:9, :], ramp(1, h=16, w=16)[..., 7:9, :], atol=60)  # rows near y = 0
    assert not torch.allclose(sheared, ramp(1, h=16, w=16), atol=1.0)


# ---------------------------------------------------------------- elastic


def test_elastic_with_zero_strength_is_identity() -> None:
    x = ramp(4, h=32, w=32)
    d = elastic_displacement(4, 32, 32, alpha=0.0, sigma=5.0, device=x.device, generator=gen())
    assert torch.equal(d, torch.zeros(4, 2, 32, 32))
    assert torch.allclose(warp(x, identity(4), d), x, atol=1e-3)


def test_elastic_field_is_smooth_per_sample_and_sized_by_alpha() -> None:
    d = elastic_displacement(8, 32, 32, alpha=50.0, sigma=5.0, device=torch.device("cpu"), generator=gen())
    assert d.shape == (8, 2, 32, 32)
    step = (d[:, :, 1:] - d[:, :, :-1]).abs().mean()
    assert step < 0.25 * d.abs().mean()  # neighbours move together: smoothed, not per-pixel noise
    assert 0.1 < d.std() < 3.0  # alpha 50, sigma 5: about a pixel, as torchvision's ElasticTransform
    assert not torch.allclose(d[0], d[1])
    half = elastic_displacement(8, 32, 32, alpha=25.0, sigma=5.0, device=torch.device("cpu"), generator=gen())
    assert torch.allclose(half * 2, d, atol=1e-5)  # same noise, half the strength


def test_elastic_moves_content() -> None:
    x = ramp(2, h=32, w=32)
    d = elastic_displacement(2, 32, 32, alpha=50.0, sigma=5.0, device=x.device, generator=gen())
    assert not torch.allclose(warp(x, identity(2), d), x, atol=1.0)


# ---------------------------------------------------------------- blur and grayscale


def test_blur_keeps_a_constant_image_and_spreads_an_impulse_by_sigma() -> None:
    const = torch.full((2, 3, 8, 8), 100.0)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 2.0])), const, atol=1e-3)
    impulse = torch.zeros(3, 1, 9, 9)
    impulse[:, 0, 4, 4] = 90.0
    out = gaussian_blur(impulse, torch.tensor([0.1, 1.0, 2.0]))
    assert torch.allclose(out.sum(dim=(1, 2, 3)), torch.full((3,), 90.0), atol=1e-3)  # mass preserved
    assert out[0, 0, 4, 4] > 89.9  # sigma 0.1: practically identity
    centre = out[:, 0, 4, 4]
    assert centre[0] > centre[1] > centre[2]  # wider sigma, more spread
    w = math.exp(-0.5)  # sigma 1: neighbour/centre = exp(-1/2) per axis
    assert out[1, 0, 4, 5] / out[1, 0, 4, 4] == pytest.approx(w, rel=1e-4)
    assert out[1, 0, 3, 3] / out[1, 0, 4, 4] == pytest.approx(w * w, rel=1e-4)
    assert out[1, 0, 4, 6] == 0  # 3x3: nothing beyond one pixel


def test_grayscale_makes_channels_equal_to_luma() -> None:
    x = ramp(4)
    out = random_grayscale(x, p=1.0, generator=gen())
    luma = sum(w * x[:, i] for i, w in enumerate(GRAY_WEIGHTS))
    for ch in range(3):
        assert torch.allclose(out[:, ch], luma, atol=1e-3)
    assert torch.equal(random_grayscale(x, p=0.0, generator=gen()), x)


def test_grayscale_is_per_sample_and_a_no_op_on_one_channel() -> None:
    x = ramp(200)
    out = random_grayscale(x, p=0.5, generator=gen())
    gray = [torch.equal(out[i, 0], out[i, 1]) for i in range(200)]
    assert 50 < sum(gray) < 150
    one = ramp(4, c=1)
    assert torch.equal(random_grayscale(one, p=1.0, generator=gen()), one)


# ---------------------------------------------------------------- the levels


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_level_keeps_shape_and_range(level: str, channels: int) -> None:
    x = torch.randint(0, 256, (8, channels, 28, 28), dtype=torch.uint8)
    out = augment(x, level, flip=channels == 3, generator=gen())
    assert out.shape == x.shape
    assert out.float().min() >= -1e-3 and out.float().max() <= 255 + 1e-3


@pytest.mark.parametrize("level", ["strong", "stronger"])
def test_strong_levels_draw_parameters_per_sample_and_repeat_with_the_seed(level: str) -> None:
    x = ramp(1, h=32, w=32).expand(16, 3, 32, 32)
    out = augment(x, level, flip=True, generator=gen(5))
    assert all(not torch.allclose(out[i], out[j], atol=1.0) for i in range(16) for j in range(i))
    assert torch.equal(out, augment(x, level, flip=True, generator=gen(5)))


def test_stronger_differs_from_strong_with_the_same_seed() -> None:
    x = ramp(4, h=32, w=32)
    assert not torch.allclose(augment(x, "strong", flip=True, generator=gen(1)),
                              augment(x, "stronger", flip=True, generator=gen(1)))


def test_unknown_level_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError,
                       match=r"augmentation 'heavy' is not known; allowed: none, base, translate, strong, stronger"):
        augment(ramp(1), "heavy", flip=True)


def test_every_level_is_selectable_in_a_study_file_and_others_are_refused() -> None:
    from hpsearch._errors import SpecError
    from hpsearch.spec import spec_from_dict
    from hpsearch.strategies import STRATEGIES

    study = {"name": "a", "dataset": "synthetic", "strategy": "scratch", "epochs": 1, "n_trials": 1}
    spec = spec_from_dict({**study, "space": {"augmentation": list(LEVELS)}}, where="x.toml")
    assert spec.space_overrides["augmentation"] == ["none", "base", "translate", "strong", "stronger"]
    assert STRATEGIES["scratch"].params["augmentation"].allowed == LEVELS
    with pytest.raises(SpecError, match=r'^x.toml: space.augmentation: \["heavy"\] must be one of "none", "base", '
                                        r'"translate", "strong", "stronger"$'):
        spec_from_dict({**study, "space": {"augmentation": ["heavy"]}}, where="x.toml")
