"""S2 multi-scale features in PyTorch, as the official MoIIE code computes them (its s2wrapper: chessboard split and
merge, bicubic resize, area pooling) on a transformers SigLIP: the reference for tests/test_s2.py and test_bunny.py."""

import torch
import torch.nn.functional as F


def _split_chessboard(x, n):
  """[B, C, H, W] -> [n * n * B, C, H / n, W / n], tile-major (the official s2wrapper's order)."""
  h, w = x.shape[2] // n, x.shape[3] // n
  return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(n) for j in range(n)], dim=0)


def _merge_chessboard(x, n):
  b = x.shape[0] // (n * n)
  return torch.cat([torch.cat([x[(i * n + j) * b:(i * n + j + 1) * b] for j in range(n)], dim=-1)
                    for i in range(n)], dim=-2)


def torch_s2_features(model, images, scales):
  """images [B, C, S, S] -> [B, g^2, len(scales) * D]: hidden state -2 of every tile, merged, area-pooled."""
  outs = []
  for size in scales:
    x = F.interpolate(images.float(), size=size, mode='bicubic')
    n = size // scales[0]
    with torch.no_grad():
      y = model(pixel_values=_split_chessboard(x, n), output_hidden_states=True).hidden_states[-2]
    g = int(y.shape[1] ** 0.5)
    y = y.transpose(1, 2).reshape(y.shape[0], -1, g, g)  # b (h w) c -> b c h w
    outs.append(_merge_chessboard(y, n))
  size = outs[0].shape[-2]
  out = torch.cat([F.interpolate(o.float(), size=size, mode='area') for o in outs], dim=1)
  return out.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
