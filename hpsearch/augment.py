"""Batched augmentation on the training device: whole-batch tensor ops, per-sample random parameters, no PIL.

Input: images [B, C, H, W] in 0..255 units (before normalisation, so padding is black as in torchvision's
RandomCrop(padding=4)), float or uint8. ``none`` and ``base`` keep the dtype (the batch step crops uint8, a
quarter of the bytes to move); ``strong`` and ``stronger`` return float.

Levels, as in the report this project grew out of (torchvision's defaults where the report names only the op):
- ``base``: random crop with 4-px zero padding + horizontal flip (flip off for digit datasets).
- ``translate``: airbench94's: a random shift of up to ``translate`` px (2 by default) with reflect padding +
  horizontal flip (flip off for digit datasets). No black border: with 2 px the image keeps all its content.
- ``strong``: ``base`` + random perspective (distortion 0.5, p = 0.5) + random rotation (±10°) + Gaussian blur
  (3x3, sigma 0.1..2) + random grayscale (p = 0.1).
- ``stronger``: ``strong`` + random affine (shear ±10°, scale 0.8..1.2) + elastic distortion (alpha 50, sigma 5).

All geometric ops of a level (crop, flip, perspective, rotation, affine, elastic) are composed into ONE sampling
grid and resampled with one ``grid_sample``: one bilinear interpolation instead of one per op, and one pass over
the batch. Blur and grayscale run after it.

Coordinates: pixel units with the origin at the image centre, x to the right, y down; a pixel's centre is at
``j + 0.5 - W/2``. Matrices are 3x3 homogeneous SAMPLING maps: output position -> input position (the inverse of
the forward transform the name describes).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

LEVELS = ("none", "base", "translate", "strong", "stronger")

PERSPECTIVE_DISTORTION = 0.5  # corners move inwards by up to this fraction of the half-size (torchvision default)
PERSPECTIVE_P = 0.5
ROTATION_DEGREES = 10.0
BLUR_SIGMA = (0.1, 2.0)  # torchvision GaussianBlur's default sigma range
GRAYSCALE_P = 0.1
SHEAR_DEGREES = 10.0
SCALE = (0.8, 1.2)
ELASTIC_ALPHA = 50.0  # torchvision ElasticTransform's defaults: displacement alpha/2 px per unit of smoothed noise
ELASTIC_SIGMA = 5.0  # pixels


def augment(x: torch.Tensor, level: str, *, flip: bool, generator: torch.Generator | None = None,
            translate: int = 2, flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``flip_mask`` (bool [B]): which images to mirror, instead of a random half (alternating flips)."""
    if level == "none":
        return x
    if level == "base":
        return random_crop(x, padding=4, flip=flip, generator=generator, flip_mask=flip_mask)
    if level == "translate":
        return random_translate(x, translate, flip=flip, generator=generator, flip_mask=flip_mask)
    if level in ("strong", "stronger"):
        stronger = level == "stronger"
        x = x.float()
        b, _, h, w = x.shape
        matrix = crop_matrix(b, padding=4, device=x.device, generator=generator)
        if flip:
            matrix = matrix @ flip_matrix(b, device=x.device, generator=generator, mask=flip_mask)
        matrix = matrix @ perspective_matrix(b, h, w, distortion=PERSPECTIVE_DISTORTION, p=PERSPECTIVE_P,
                                             device=x.device, generator=generator)
        matrix = matrix @ rotation_matrix(_uniform(b, -ROTATION_DEGREES, ROTATION_DEGREES, x.device, generator))
        displacement = None
        if stronger:
            matrix = matrix @ shear_scale_matrix(_uniform(b, -SHEAR_DEGREES, SHEAR_DEGREES, x.device, generator),
                                                 _uniform(b, *SCALE, x.device, generator))
            displacement = elastic_displacement(b, h, w, alpha=ELASTIC_ALPHA, sigma=ELASTIC_SIGMA,
                                                device=x.device, generator=generator)
        x = warp(x, matrix, displacement)
        x = gaussian_blur(x, _uniform(b, *BLUR_SIGMA, x.device, generator))
        return random_grayscale(x, p=GRAYSCALE_P, generator=generator)
    raise ValueError(f"augmentation {level!r} is not known; allowed: {', '.join(LEVELS)}")


def _uniform(b: int, low: float, high: float, device: torch.device,
             generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(b, device=device, generator=generator) * (high - low) + low


# ---------------------------------------------------------------- exact pixel ops (the base level)


def random_crop(x: torch.Tensor, *, padding: int, flip: bool = False,
                generator: torch.Generator | None = None, flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut an HxW window at a per-sample random offset (RandomCrop(padding=p));
    with ``flip``, a random half of the batch is also mirrored left-right (RandomHorizontalFlip).

    Both in ONE flat gather (``torch.take``) over the padded batch, any dtype: each sample's window is a start
    offset plus a fixed table of in-window offsets, with the column order reversed for flipped samples.
    Measured on 64x3x32x32 float, 2 CPU threads: 0.43 ms, against 0.96 ms for advanced indexing
    ``padded[b, c, rows, cols]`` and 1.05 ms for a bilinear ``grid_sample`` shift.
    """
    b, c, h, w = x.shape
    hp, wp = h + 2 * padding, w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    dy = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device)[:, None] * wp
    cols = torch.arange(w, device=x.device)
    window = (rows + cols).view(1, 1, h * w)
    start = torch.arange(b * c, device=x.device).view(b, c, 1) * (hp * wp) + dy * wp + dx
    if flip:
        mirrored = (rows + cols.flip(0)).view(1, 1, h * w)
        window = torch.where(_flips(b, x.device, generator, flip_mask), mirrored, window)  # [B, 1, HW]
    return torch.take(padded, start + window).view(b, c, h, w)


def _flips(b: int, device: torch.device, generator: torch.Generator | None,
           mask: torch.Tensor | None) -> torch.Tensor:
    """[B, 1, 1] bool: the given per-image mask, or a random half of the batch."""
    if mask is not None:
        return mask.view(b, 1, 1)
    return torch.rand(b, 1, 1, device=device, generator=generator) < 0.5


def random_translate(x: torch.Tensor, pixels: int, *, flip: bool = False, generator: torch.Generator | None = None,
                     flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Shifts each image by -pixels..pixels along each axis, filling the border by reflection (F.pad's "reflect":
    the edge pixel is not repeated), and mirrors a random half (or ``flip_mask``) when ``flip``. Any dtype, one flat
    gather as ``random_crop``: each output pixel reads input row reflect(i + dy) and column reflect(j + dx)."""
    b, c, h, w = x.shape
    dy = torch.randint(-pixels, pixels + 1, (b, 1), device=x.device, generator=generator)
    dx = torch.randint(-pixels, pixels + 1, (b, 1), device=x.device, generator=generator)
    rows = _reflect(torch.arange(h, device=x.device) + dy, h)  # [B, H]
    cols = torch.arange(w, device=x.device)
    if flip:
        cols = torch.where(_flips(b, x.device, generator, flip_mask).view(b, 1), cols.flip(0), cols)
    cols = _reflect(cols + dx, w)  # [B, W]
    window = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w)
    start = torch.arange(b * c, device=x.device).view(b, c, 1) * (h * w)
    return torch.take(x, start + window).view(b, c, h, w)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside 0..n-1 mirrored about the edge pixels (-1 -> 1, n -> n-2), as reflect padding reads them."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


# ---------------------------------------------------------------- geometric ops as sampling matrices [B, 3, 3]


def _affine(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
            tx: torch.Tensor | None = None, ty: torch.Tensor | None = None) -> torch.Tensor:
    """[[a, b, tx], [c, d, ty], [0, 0, 1]] per sample."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    tx = zero if tx is None else tx
    ty = zero if ty is None else ty
    return torch.stack([a, b, tx, c, d, ty, zero, zero, one], dim=-1).view(-1, 3, 3)


def crop_matrix(b: int, *, padding: int, device: torch.device,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(padding=p) as an integer shift in -p..p per axis: exact under bilinear sampling, zero fill."""
    shift = torch.randint(-padding, padding + 1, (2, b), device=device, generator=generator).float()
    one, zero = torch.ones(b, device=device), torch.zeros(b, device=device)
    return _affine(one, zero, zero, one, shift[0], shift[1])


def flip_matrix(b: int, *, device: torch.device, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Horizontal flip of a random half of the batch (or of ``mask``): x -> -x about the centre."""
    sign = torch.where(_flips(b, device, generator, mask).view(b), -1.0, 1.0)
    zero = torch.zeros(b, device=device)
    return _affine(sign, zero, zero, torch.ones(b, device=device))


def rotation_matrix(degrees: torch.Tensor) -> torch.Tensor:
    """Rotates the image content by ``degrees`` (per sample; positive = counter-clockwise on screen)."""
    theta = torch.deg2rad(degrees)
    cos, sin = torch.cos(theta), torch.sin(theta)
    # With y down, the forward on-screen counter-clockwise turn is [[cos, sin], [-sin, cos]]; sampling uses its inverse.
    return _affine(cos, -sin, sin, cos)


def shear_scale_matrix(shear_degrees: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Forward map x' = s (x + tan(shear) y), y' = s y; sampled through its inverse."""
    t = torch.tan(torch.deg2rad(shear_degrees))
    inv = 1.0 / scale
    return _affine(inv, -t * inv, torch.zeros_like(t), inv)


def perspective_matrix(b: int, h: int, w: int, *, distortion: float, p: float, device: torch.device,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomPerspective: with probability ``p`` each corner moves inwards by up to ``distortion`` x half-size.

    The homography that sends the moved corners back to the image corners is solved per sample (a batched
    8x8 system): output pixels at the moved corners sample the original corners.
    """
    corners = torch.tensor([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], device=device)
    inward = -corners.sign()  # [4, 2]
    half = torch.tensor([w / 2, h / 2], device=device)
    amount = torch.rand(b, 4, 2, device=device, generator=generator) * distortion * half
    apply = (torch.rand(b, 1, 1, device=device, generator=generator) < p).float()
    moved = corners + inward * amount * apply  # [B, 4, 2]: where each corner lands in the output
    # Solved in half-size units (coordinates within [-1, 1]: a well-conditioned float32 system), then scaled back.
    unit = homography(moved / half, (corners / half).expand(b, 4, 2))
    to_unit = torch.diag(torch.tensor([2 / w, 2 / h, 1.0], device=device))
    from_unit = torch.diag(torch.tensor([w / 2, h / 2, 1.0], device=device))
    return from_unit @ unit @ to_unit


def homography(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """The [B, 3, 3] projective maps with H(src_i) = dst_i for 4 point pairs [B, 4, 2] each."""
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    zero, one = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # [B, 8, 8]
    rhs = torch.cat([u, v], dim=1)  # [B, 8]
    coef = torch.linalg.solve(a, rhs)
    return torch.cat([coef, torch.ones_like(coef[:, :1])], dim=1).view(-1, 3, 3)


def elastic_displacement(b: int, h: int, w: int, *, alpha: float, sigma: float, device: torch.device,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """ElasticTransform's field: uniform(-1, 1) noise per pixel and axis, Gaussian-smoothed (sigma px), times
    alpha / 2 px (torchvision's alpha / size in [-1, 1] units). Returns [B, 2, H, W] in pixels (x, then y).

    The smoothing runs on a grid ``f`` times coarser (f ~ sigma / 1.25): noise there has the std of an f x f
    average of per-pixel noise (1/f of it), is blurred with sigma / f, and is upsampled bilinearly; what is lost
    is only detail the blur removes anyway (alpha 50, sigma 5, 32x32: displacement std 0.95 px against 1.04 px
    for the full-resolution blur, mean neighbour difference 0.077 against 0.098 px). Blur and upsampling are
    linear and separable, so they are one [H, Hc] and one [W, Wc] matrix (built once): two small matmuls.
    Cost for 64 fields of 32x32 on 2 CPU threads: about 0.1 ms, against 9.3 ms for the full-resolution blur
    (torchvision's 41-tap kernel at sigma 5, twice the base CNN's whole training step) and 0.8 ms for the
    same coarse blur as depthwise convolutions.
    """
    f = max(1, min(int(sigma / 1.25), h // 2, w // 2))
    hc, wc = -(-h // f), -(-w // f)
    noise = (torch.rand(b, 2, hc, wc, device=device, generator=generator) * 2 - 1) / f
    if alpha == 0:
        return torch.zeros(b, 2, h, w, device=device)
    rows = _smooth_and_upsample(hc, h, sigma / f, device)  # [H, Hc]
    cols = _smooth_and_upsample(wc, w, sigma / f, device)  # [W, Wc]
    # rows @ noise @ cols.T as plain matmuls: 0.07 ms, against 0.19 ms for the same product as one einsum.
    return rows @ noise @ cols.T * (alpha / 2)


@functools.lru_cache(maxsize=16)
def _smooth_and_upsample(n_in: int, n_out: int, sigma: float, device: torch.device) -> torch.Tensor:
    """The [n_out, n_in] matrix of a 1-D Gaussian blur (reflect padding, taps to 4 sigma, as torchvision) followed
    by linear upsampling (align_corners=False): its columns are the responses to unit impulses."""
    impulses = torch.eye(n_in, device=device).view(n_in, 1, n_in)
    radius = max(0, min(int(4 * sigma), n_in - 1))  # reflect padding needs it shorter than the signal
    if sigma > 0 and radius > 0:
        taps = _gaussian_1d(torch.tensor([sigma], device=device), radius).view(1, 1, -1)
        impulses = F.conv1d(F.pad(impulses, (radius, radius), mode="reflect"), taps)
    if n_out != n_in:
        impulses = F.interpolate(impulses, size=n_out, mode="linear", align_corners=False)
    return impulses.view(n_in, n_out).T.contiguous()


def warp(x: torch.Tensor, matrix: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resamples every image once: output pixel p (moved by ``displacement`` [B, 2, H, W] pixels) reads the input
    at matrix @ p, bilinear, zero outside. One grid_sample for the whole batch."""
    b, _, h, w = x.shape
    # grid_sample's [-1, 1] spans the outer pixel edges (align_corners=False): pixels -> those units folded into
    # the matrix.
    to_unit = torch.tensor([[2 / w, 0, 0], [0, 2 / h, 0], [0, 0, 1]], device=x.device, dtype=x.dtype)
    m = to_unit @ matrix.to(x.dtype)  # [B, 3, 3]
    points = _pixel_centres(h, w, x.device, x.dtype).expand(b, 2, h * w)  # planar [B, (x, y), H*W]
    if displacement is not None:
        points = points + displacement.reshape(b, 2, h * w)
    # M [x, y, 1] as translation + M[:, :, :2] @ [x, y]: one baddbmm, 0.035 ms for 64x32x32 on 2 CPU threads,
    # against 0.25 ms for one [B*3, 3] x [3, H*W] GEMM and 0.49 ms for [B, H*W, 3] @ [B, 3, 3].
    src = torch.baddbmm(m[:, :, 2:], m[:, :, :2], points)  # [B, 3, H*W]
    grid = (src[:, :2] / src[:, 2:]).transpose(1, 2).reshape(b, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@functools.lru_cache(maxsize=16)
def _pixel_centres(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[2, H*W]: x and y of every pixel centre, row by row."""
    ys = torch.arange(h, device=device, dtype=dtype) + 0.5 - h / 2
    xs = torch.arange(w, device=device, dtype=dtype) + 0.5 - w / 2
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy")).view(2, h * w)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotation alone (per-sample angles [B]), for tests and callers that want one op."""
    return warp(x, rotation_matrix(degrees.to(x.device, x.dtype)))


# ---------------------------------------------------------------- photometric ops


def _gaussian_1d(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalised 1-D Gaussian taps [N, 2r+1] for N sigmas."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=sigma.dtype)
    k = torch.exp(-0.5 * (t / sigma[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian blur with a per-sample sigma [B] (reflect padding, like torchvision's GaussianBlur).

    Separable and symmetric: along each axis, centre tap times x plus edge tap times the two neighbours. Four
    multiply-adds over the batch, 0.18 ms for 64x3x32x32 on 2 CPU threads, against 0.25 ms for one depthwise
    conv with a kernel per sample.
    """
    b = x.shape[0]
    taps = _gaussian_1d(sigma.to(x.dtype), 1)  # [B, 3]: edge, centre, edge
    centre, edge = taps[:, 1].view(b, 1, 1, 1), taps[:, 0].view(b, 1, 1, 1)
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    rows = torch.addcmul(p[..., 1:-1] * centre, p[..., :-2] + p[..., 2:], edge)  # along W: [B, C, H+2, W]
    return torch.addcmul(rows[:, :, 1:-1] * centre, rows[:, :, :-2] + rows[:, :, 2:], edge)


GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def random_grayscale(x: torch.Tensor, *, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replaces a random fraction ``p`` of the batch by its luma in all three channels; 1-channel data is unchanged."""
    if x.shape[1] != 3:
        return x
    mask = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator) < p
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray = (x * weights).sum(dim=1, keepdim=True)
    return torch.where(mask, gray.expand_as(x), x)
