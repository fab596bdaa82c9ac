"""Self-supervised views (``--augment ssl``), batched, on the images' device.

Barlow Twins' augmentation as blockwise SSL's reference draws it (Siddiqui, Krueger,
LeCun & Deny 2023, shoaibahmed/blockwise_ssl ``main.py`` ``Transform``; Zbontar et al.
2021), for every image of a batch independently:

1. a random resized crop (area 8-100 % of the image, aspect ratio 3/4-4/3, as
   torchvision's ``RandomResizedCrop`` draws it) scaled back to the image's size,
   bilinearly, then a horizontal flip with probability 0.5;
2. with probability 0.8, colour jitter: brightness and contrast factors in [0.6, 1.4],
   saturation in [0.8, 1.2], a hue shift in [-0.1, 0.1], applied in a random order
   per image (torchvision's ``ColorJitter(0.4, 0.4, 0.2, 0.1)``, same formulas);
3. grayscale with probability 0.2;
4. solarisation (pixels at 128/255 or above become 1 - x) with probability 0.1.

Differences from the reference: both views are drawn alike (the reference's first view
is always blurred and never solarised, its second blurred with probability 0.1 and
solarised with 0.2: 0.1 is their mean); no Gaussian blur (a sigma of up to 2 px blurs a
224-px image lightly and a 32-px one away, so SimCLR's CIFAR recipe drops it too);
bilinear rather than bicubic resizing; the colour operations work on floats, not on
8-bit images rounded after each.
"""

from __future__ import annotations

import math

import torch

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
JITTER = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}
P_JITTER, P_GRAY, P_SOLARIZE = 0.8, 0.2, 0.1
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def ssl_views(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One self-supervised view of each uint8 ``(B, C, H, W)`` image, float in [0, 1].

    Random numbers come from ``generator`` (drawn on its device, CPU if ``None``).
    Colour jitter, grayscale and solarisation need 3 channels; a 1-channel image gets
    brightness, contrast and solarisation only.
    """
    b = len(images)
    rng = generator.device if generator is not None else torch.device("cpu")

    def uniform(low: float, high: float) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=rng)
        return (low + (high - low) * u).to(images.device)

    def coin(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator, device=rng) < p).to(images.device)

    boxes = crop_boxes(images.shape[-2:], b, generator)
    x = resized_crop(images.float().div(255), boxes, flip=coin(0.5))
    factors = {name: uniform(1 - s, 1 + s) if name != "hue" else uniform(-s, s)
               for name, s in JITTER.items()}
    order = torch.rand(b, len(JITTER), generator=generator, device=rng).argsort(1)
    order = order.to(images.device)  # moved once, read at every step
    jittered = coin(P_JITTER)
    codes = {n: i for i, n in enumerate(JITTER)
             if n in ("brightness", "contrast") or x.shape[1] == 3}  # what 1 channel allows
    for step in range(len(JITTER)):  # each image's own order of the four operations
        for name, code in codes.items():  # every image computed, the chosen kept: no host sync
            chosen = jittered & (order[:, step] == code)
            x = torch.where(chosen.view(-1, 1, 1, 1), adjust(x, name, factors[name]), x)
    if x.shape[1] == 3:
        x = torch.where(coin(P_GRAY).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    solarized = torch.where(x >= 128 / 255, 1 - x, x)
    return torch.where(coin(P_SOLARIZE).view(-1, 1, 1, 1), solarized, x)


def crop_boxes(size: tuple[int, int] | torch.Size, n: int, generator: torch.Generator | None
               = None, attempts: int = 10) -> torch.Tensor:
    """``(n, 4)`` crop boxes ``(top, left, height, width)`` in pixels, drawn as torchvision's
    ``RandomResizedCrop.get_params`` draws them: up to ``attempts`` tries of an area and a
    log-uniform aspect ratio; an image with no try that fits gets the centre crop of the
    nearest allowed ratio (the whole image when it is square)."""
    h, w = size
    rng = generator.device if generator is not None else torch.device("cpu")
    area = h * w * (SCALE[0] + (SCALE[1] - SCALE[0])
                    * torch.rand(n, attempts, generator=generator, device=rng, dtype=torch.float64))
    logs = math.log(RATIO[0]), math.log(RATIO[1])
    ratio = torch.exp(logs[0] + (logs[1] - logs[0]) * torch.rand(
        n, attempts, generator=generator, device=rng, dtype=torch.float64))
    cw = torch.round(torch.sqrt(area * ratio)).long()
    ch = torch.round(torch.sqrt(area / ratio)).long()
    if w / h < RATIO[0]:
        fh, fw = round(w / RATIO[0]), w
    elif w / h > RATIO[1]:
        fh, fw = h, round(h * RATIO[1])
    else:
        fh, fw = h, w
    # The centre crop is a last try that always fits: the first try that fits is taken.
    ch = torch.cat([ch, ch.new_full((n, 1), fh)], 1)
    cw = torch.cat([cw, cw.new_full((n, 1), fw)], 1)
    first = ((cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)).float().argmax(1, keepdim=True)
    ch, cw, centre = ch.gather(1, first)[:, 0], cw.gather(1, first)[:, 0], first[:, 0] == attempts
    u = torch.rand(n, 2, generator=generator, device=rng, dtype=torch.float64)
    top = torch.where(centre, (h - fh) // 2, (u[:, 0] * (h - ch + 1)).long())
    left = torch.where(centre, (w - fw) // 2, (u[:, 1] * (w - cw + 1)).long())
    return torch.stack([top, left, ch, cw], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Each image's box ``(top, left, height, width)`` resized bilinearly to the image's
    size, as ``F.interpolate(crop, size, mode="bilinear", align_corners=False)`` resizes
    the cropped image (samples outside the crop clamp to its edge), mirrored where
    ``flip`` is true."""
    b, _, h, w = x.shape
    rows0, rows1, wy = _taps(boxes[:, 0], boxes[:, 2], h, x)
    cols0, cols1, wx = _taps(boxes[:, 1], boxes[:, 3], w, x)
    if flip is not None:
        f = flip.view(-1, 1)
        cols0, cols1 = torch.where(f, cols0.flip(1), cols0), torch.where(f, cols1.flip(1), cols1)
        wx = torch.where(f, wx.flip(1), wx)
    batch = torch.arange(b, device=x.device).view(-1, 1, 1)

    def at(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) -> BCHW
        return x[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    wy, wx = wy[:, None, :, None], wx[:, None, None, :]
    top = at(rows0, cols0) * (1 - wx) + at(rows0, cols1) * wx
    bottom = at(rows1, cols0) * (1 - wx) + at(rows1, cols1) * wx
    return top * (1 - wy) + bottom * wy


def _taps(start: torch.Tensor, length: torch.Tensor, out: int, x: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image and output index along one axis: the two input indices a bilinear
    resize of ``[start, start + length)`` to ``out`` reads, and the second's weight."""
    start, length = start.to(x.device).view(-1, 1), length.to(x.device).view(-1, 1)
    pos = ((torch.arange(out, device=x.device, dtype=x.dtype) + 0.5) * length / out
           - 0.5).clamp_min(0)
    low = pos.floor().long().clamp(max=length - 1)
    weight = pos - low
    return start + low, start + torch.minimum(low + 1, length - 1), weight


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1, H, W)`` luma of ``(B, 3, H, W)`` RGB in [0, 1] (torchvision's weights)."""
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def adjust(x: torch.Tensor, name: str, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_<name>`` of floats in [0, 1], with one factor per image."""
    f = factor.view(-1, 1, 1, 1)
    if name == "hue":
        return shift_hue(x, factor)
    if name == "brightness":
        base = torch.zeros_like(x)
    elif name == "contrast":
        luma = grayscale(x) if x.shape[1] == 3 else x
        base = luma.mean((1, 2, 3), keepdim=True)
    else:
        base = grayscale(x)
    return (f * x + (1 - f) * base).clamp(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``shift`` (a fraction of the circle), through HSV."""
    r, g, b = x.unbind(1)
    high, argmax = x.max(1)
    low = x.min(1).values
    span = high - low
    sat = torch.where(high > 0, span / high.clamp_min(1e-12), torch.zeros_like(high))
    safe = torch.where(span > 0, span, torch.ones_like(span))
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6,
                      torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    hue = torch.where(span > 0, hue, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(hue, sat, high)


def hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB of hue, saturation and value maps ``(B, H, W)`` in [0, 1]."""
    offsets = torch.arange(5, 0, -2, device=h.device, dtype=h.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = (offsets + 6 * h.unsqueeze(1)) % 6  # channel c is v - v s clamp(min(k, 4 - k), 0, 1)
    v, s = v.unsqueeze(1), s.unsqueeze(1)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)
