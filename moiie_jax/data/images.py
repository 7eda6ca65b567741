"""Image loading and per-tower preprocessing: PIL image -> float32[H, W, C] (channels last, normalised).

Two recipes, as the towers were trained (and as Hugging Face's PIL image processors do them):
  siglip  resize to exactly (height, width) with bicubic resampling, then (x / 255 - 0.5) / 0.5
  clip    resize the shortest side to `height` (bicubic, the long side int(size * long / short)), centre crop
          (height, width), then (x / 255 - CLIP mean) / CLIP std
Optionally the image is first padded to a square with the mean colour (LLaVA's `expand2square`, Bunny's
`image_aspect_ratio='pad'`), so that nothing is cropped away. Resampling is PIL's on uint8 pixels, the same call HF
makes, so results match `SiglipImageProcessor` / `CLIPImageProcessor` to float rounding.

Every failure to read an image raises `ImageError`, which names the file; the pipeline turns it into a counted skip
or a failure, as configured.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ('squash', 'shortest_crop')
_RESAMPLE = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR,
             'nearest': Image.Resampling.NEAREST, 'lanczos': Image.Resampling.LANCZOS}


class ImageError(ValueError):
  """An image file is missing or cannot be decoded. `kind` is 'missing_image' or 'corrupt_image'."""

  def __init__(self, kind: str, path: str, detail: str):
    super().__init__(f'{path}: {detail}')
    self.kind = kind
    self.path = path


@dataclasses.dataclass(frozen=True)
class ImageConfig:
  """How raw images become `pixel_values: float32[height, width, 3]`."""
  height: int = 384
  width: int = 384
  resize: str = 'squash'  # squash (SigLIP) | shortest_crop (CLIP)
  mean: tuple[float, float, float] = SIGLIP_MEAN
  std: tuple[float, float, float] = SIGLIP_STD
  # Pad to a square with the mean colour before resizing (LLaVA/Bunny `image_aspect_ratio='pad'`).
  pad_to_square: bool = False
  resample: str = 'bicubic'

  def validate(self) -> None:
    if self.resize not in RESIZE_MODES:
      raise ValueError(f'ImageConfig.resize={self.resize!r}: expected one of {list(RESIZE_MODES)}')
    if self.resample not in _RESAMPLE:
      raise ValueError(f'ImageConfig.resample={self.resample!r}: expected one of {sorted(_RESAMPLE)}')
    if self.height < 1 or self.width < 1:
      raise ValueError(f'ImageConfig: height={self.height}, width={self.width} must be positive')
    if self.resize == 'shortest_crop' and self.height != self.width:
      raise ValueError(f'ImageConfig: resize=shortest_crop needs a square crop, got {self.height}x{self.width}')
    for name in ('mean', 'std'):
      value = getattr(self, name)
      if len(value) != 3:
        raise ValueError(f'ImageConfig.{name}={value}: expected 3 values (RGB)')
    if min(self.std) <= 0:
      raise ValueError(f'ImageConfig.std={self.std}: must be positive')

  @property
  def fill_color(self) -> tuple[int, int, int]:
    """The padding colour of `expand2square`: the mean in 0..255, truncated as LLaVA does."""
    return tuple(int(m * 255) for m in self.mean)

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> ImageConfig:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ValueError(f'ImageConfig: unknown keys {unknown}; expected some of {sorted(names)}')
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    cfg = cls(**data)
    cfg.validate()
    return cfg


def siglip_config(size: int = 384, pad_to_square: bool = False) -> ImageConfig:
  """SigLIP (so400m-patch14-384 and friends): square bicubic resize, mean = std = 0.5."""
  return ImageConfig(size, size, 'squash', SIGLIP_MEAN, SIGLIP_STD, pad_to_square)


def clip_config(size: int = 336, pad_to_square: bool = False) -> ImageConfig:
  """CLIP ViT-L/14-336: shortest side to `size`, centre crop, OpenAI CLIP mean/std."""
  return ImageConfig(size, size, 'shortest_crop', CLIP_MEAN, CLIP_STD, pad_to_square)


def config_for_tower(architecture: str, image_size: int, pad_to_square: bool = False) -> ImageConfig:
  """The recipe of a `VisionConfig` (`architecture`, `image_size`); tiny test towers get the same recipe."""
  if architecture == 'siglip':
    return siglip_config(image_size, pad_to_square)
  if architecture == 'clip':
    return clip_config(image_size, pad_to_square)
  raise ValueError(f'vision architecture {architecture!r}: expected siglip or clip')


# ------------------------------------------------------------------------------------------------------ loading
def load_image(source: str | bytes | os.PathLike, name: str | None = None) -> Image.Image:
  """Reads and fully decodes an image file (a path or its encoded bytes) as RGB.

  `name` is used in error messages (the path is used by default). Raises ImageError('missing_image') for a file
  that does not exist and ImageError('corrupt_image') for anything PIL cannot decode, including truncated files
  (decoding is forced here, not deferred to the first pixel access).
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    name = name or '<image bytes>'
    if len(source) == 0:
      raise ImageError('missing_image', name, 'no image bytes stored')
    fileobj: Any = io.BytesIO(bytes(source))
  else:
    name = name or os.fspath(source)
    if not os.path.isfile(source):
      raise ImageError('missing_image', name, 'image file not found')
    fileobj = source
  try:
    with Image.open(fileobj) as img:
      img.load()
      # LLaVA/Bunny `.convert('RGB')`: palette, greyscale and RGBA images become plain RGB.
      return img.convert('RGB')
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ImageError('corrupt_image', name, f'cannot decode image ({type(e).__name__}: {e})') from e


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
  """Pads the short side symmetrically (extra pixel bottom/right) with `fill`, as LLaVA's expand2square."""
  width, height = img.size
  if width == height:
    return img
  side = max(width, height)
  out = Image.new(img.mode, (side, side), fill)
  out.paste(img, ((side - width) // 2, (side - height) // 2))
  return out


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(new_width, new_height) with the short side `size`; HF's get_resize_output_image_size(default_to_square=False)."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  return (size, new_long) if width <= height else (new_long, size)


def preprocess(img: Image.Image, cfg: ImageConfig) -> np.ndarray:
  """RGB PIL image -> pixel_values: float32[cfg.height, cfg.width, 3], normalised."""
  if img.mode != 'RGB':
    img = img.convert('RGB')
  if cfg.pad_to_square:
    img = expand2square(img, cfg.fill_color)
  resample = _RESAMPLE[cfg.resample]
  if cfg.resize == 'squash':
    if img.size != (cfg.width, cfg.height):
      img = img.resize((cfg.width, cfg.height), resample=resample)
    pixels = np.asarray(img)
  else:
    new_size = _shortest_side_size(img.width, img.height, cfg.height)
    if img.size != new_size:
      img = img.resize(new_size, resample=resample)
    pixels = np.asarray(img)
    # HF's center_crop: top/left rounded down.
    top = (pixels.shape[0] - cfg.height) // 2
    left = (pixels.shape[1] - cfg.width) // 2
    pixels = pixels[top:top + cfg.height, left:left + cfg.width]
  # Rescale in float64 and cast once, as HF does, so the two agree to float32 rounding.
  x = pixels.astype(np.float64) * (1 / 255)
  x = (x - np.asarray(cfg.mean)) / np.asarray(cfg.std)
  return x.astype(np.float32)


def blank(cfg: ImageConfig) -> np.ndarray:
  """pixel_values for a sample without an image: float32[H, W, 3] zeros."""
  return np.zeros((cfg.height, cfg.width, 3), np.float32)


def load_and_preprocess(source: str | bytes | os.PathLike, cfg: ImageConfig, name: str | None = None) -> np.ndarray:
  return preprocess(load_image(source, name), cfg)
