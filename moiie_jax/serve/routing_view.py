"""The chat's routing view, drawn from a `TokenRouting`: the conversation's tokens as coloured spans (the expert
group that got most of each token's routing weight, every expert's weight on hover), and the image tokens as a
heat map over the image's patch grid. Pure functions (HTML text and uint8 pixels), no UI toolkit here.

Colours: vision experts blue, shared experts purple, language experts orange; a heat-map patch mixes the three by
the patch's group weights, blended over the image.
"""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np
from PIL import Image

from moiie_jax.evaluate.token_routing import GROUPS, TokenRouting

COLORS = {'vision': (37, 99, 235), 'shared': (147, 51, 234), 'language': (234, 88, 12)}
HEAT_ALPHA = 0.6  # the heat map's share of a pixel, over the image


def _hex(rgb: Sequence[int]) -> str:
  return '#%02x%02x%02x' % tuple(rgb)


def legend_html(tr: TokenRouting | None) -> str:
  if tr is None:
    return ''
  present = [g for g in GROUPS if g in tr.groups]
  chips = ''.join(f'<span class="chip" style="background:{_hex(COLORS[g])}">{g} '
                  f'({", ".join(e for e, eg in zip(tr.experts, tr.groups) if eg == g)})</span>' for g in present)
  return f'<div class="legend">{chips}</div>'


def layer_name(tr: TokenRouting, layer: int | None) -> str:
  return 'averaged over the MoE layers' if layer is None else f'MoE layer {layer + 1} (decoder layer {tr.layers[layer]})'


def tokens_html(tr: TokenRouting | None, pieces: Sequence[str], kinds: Sequence[str], layer: int | None = None) -> str:
  """One span per text token (`pieces`: its text; `kinds`: 'prompt', 'answer' or 'image' per token), coloured by
  its top group at MoE layer `layer` (an index into tr.layers) or averaged over layers (None); the image's tokens
  are one chip pointing at the heat map. `tr` None: the model is dense and has no experts to show."""
  if tr is None:
    return ('<div id="routing-tokens" class="dense">This checkpoint is dense: it has no experts, so there is no '
            'routing to show.</div>')
  if len(pieces) != tr.weights.shape[1] or len(kinds) != len(pieces):
    raise ValueError(f'{len(pieces)} token texts and {len(kinds)} kinds for {tr.weights.shape[1]} routed tokens')
  groups = tr.group_weights(layer)
  w = tr.weights.mean(axis=0) if layer is None else tr.weights[layer]
  out, image_run = [], 0
  for t, (piece, kind) in enumerate(zip(pieces, kinds)):
    if kind == 'image':
      image_run += 1
      continue
    if image_run:
      out.append(f'<span class="image-chip">[image: {image_run} tokens, see the heat map]</span>')
      image_run = 0
    top = GROUPS[int(np.argmax(groups[t]))]
    title = ' '.join(f'{e} {w[t, e_i]:.2f}' for e_i, e in enumerate(tr.experts))
    out.append(f'<span class="tok {kind} {top}" data-group="{top}" style="background:{_hex(COLORS[top])}" '
               f'title="{html.escape(title)}">{html.escape(piece)}</span>')
  if image_run:
    out.append(f'<span class="image-chip">[image: {image_run} tokens, see the heat map]</span>')
  return (f'<div id="routing-tokens"><div class="caption">Top expert group per token, '
          f'{layer_name(tr, layer)}; hover a token for every expert\'s weight.</div>{legend_html(tr)}'
          f'<div class="tokens">{"".join(out)}</div></div>')


def heatmap(tr: TokenRouting | None, image: Image.Image | None, layer: int | None = None,
            size: int = 336) -> np.ndarray | None:
  """uint8[size, size, 3]: the image (squashed to a square, as the tower sees it) under its patches' group colours
  at `layer` (None: averaged), or None without image tokens. The patch grid is the image tokens' square grid
  (row-major, as the connector emits them)."""
  if tr is None or image is None:
    return None
  rows = np.flatnonzero(tr.modality == 1)
  if rows.size == 0:
    return None
  n = rows.size
  side = math.isqrt(n)
  grid = (side, side) if side * side == n else (1, n)
  mix = tr.group_weights(layer)[rows] @ np.asarray([COLORS[g] for g in GROUPS], np.float32)  # [n, 3]
  heat = Image.fromarray(mix.reshape(*grid, 3).clip(0, 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
  base = np.asarray(image.convert('RGB').resize((size, size), Image.BICUBIC), np.float32)
  return (HEAT_ALPHA * np.asarray(heat, np.float32) + (1 - HEAT_ALPHA) * base).round().astype(np.uint8)


CSS = '''
#routing-tokens .tokens { line-height: 2.0; white-space: pre-wrap; font-family: monospace; }
#routing-tokens .tok { color: white; padding: 1px 2px; margin: 0 1px; border-radius: 3px; }
#routing-tokens .tok.answer { outline: 2px solid #111; }
#routing-tokens .image-chip { background: #ddd; padding: 1px 4px; border-radius: 3px; }
#routing-tokens .legend .chip { color: white; padding: 2px 6px; margin-right: 6px; border-radius: 4px; }
#routing-tokens .caption { margin-bottom: 4px; }
'''
