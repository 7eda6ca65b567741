"""The converted-checkpoint folder: what `python -m moiie_jax.convert` writes and every other tool reads.

    DIR/config.json     our LVLMConfig (moiie_jax.models.config.save_json)
    DIR/params/         an Orbax checkpoint of the model's nnx.Param state
    DIR/meta.json       {"template": chat template name, "source": where the weights came from, ...}
    DIR/tokenizer.json  (and the other tokenizer files found beside the source LLM)

A folder is written under a temporary name beside DIR and renamed into place only when complete, so a crash
or a bad input never leaves a partial checkpoint at DIR.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flax import nnx

from moiie_jax.convert import hf
from moiie_jax.convert import streaming
from moiie_jax.convert.errors import ConvertError
from moiie_jax.models import config as config_lib
from moiie_jax.models.lvlm import LVLM
from moiie_jax.store.params import restore_params, save_params, save_params_in_groups

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'added_tokens.json', 'chat_template.jinja', 'generation_config.json')


def save_folder(out_dir: str, cfg: config_lib.LVLMConfig, params: nnx.State | streaming.LazyParams, *,
                tokenizer_dir: str | None = None, meta: dict[str, Any] | None = None, overwrite: bool = False) -> str:
  """Writes a complete converted-checkpoint folder at `out_dir` atomically; returns its absolute path.

  params: an nnx.State, or `streaming.LazyParams` (written a layer at a time, each parameter cast to the dtype
  cfg's model gives it)."""
  with hf.atomic_folder(out_dir, overwrite) as tmp:
    config_lib.save_json(cfg, os.path.join(tmp, 'config.json'))
    if isinstance(params, streaming.LazyParams):
      save_params_in_groups(os.path.join(tmp, 'params'), params.retarget(cfg, abstract_model).groups())
    else:
      save_params(os.path.join(tmp, 'params'), params)
    copied = hf.copy_files(tokenizer_dir, TOKENIZER_FILES, tmp)
    with open(os.path.join(tmp, 'meta.json'), 'w') as f:
      json.dump({**(meta or {}), 'tokenizer_files': copied}, f, indent=2, sort_keys=True)
  return os.path.abspath(out_dir)


def read_meta(folder: str) -> dict[str, Any]:
  path = os.path.join(folder, 'meta.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_config(folder: str) -> config_lib.LVLMConfig:
  if not os.path.isdir(folder):
    raise ConvertError(f'{folder}: no such checkpoint folder')
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise ConvertError(f'{folder}: no config.json, so this is not a moiie_jax checkpoint folder (convert a '
                       f'Hugging Face checkpoint with `python -m moiie_jax.convert` first)')
  cfg = config_lib.load_json(path)
  if not isinstance(cfg, config_lib.LVLMConfig):
    raise ConvertError(f'{path}: holds a {type(cfg).__name__}, expected an LVLMConfig')
  return cfg


def abstract_model(cfg: config_lib.LVLMConfig) -> LVLM:
  return nnx.eval_shape(lambda: LVLM(cfg, rngs=nnx.Rngs(0)))


def load_folder(folder: str) -> tuple[config_lib.LVLMConfig, LVLM, dict[str, Any]]:
  """(config, model with restored weights, meta) from a converted-checkpoint folder."""
  cfg = load_config(folder)
  model = abstract_model(cfg)
  nnx.update(model, restore_params(os.path.join(folder, 'params'), nnx.state(model, nnx.Param)))
  return cfg, model, read_meta(folder)
