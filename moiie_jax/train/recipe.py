"""The training config schema shared by every recipe in configs/, and the model it describes.

A recipe file is `configs/NAME.py` with `get_config(arg)` returning `base_config()` with fields changed. Fields:

  seed                      model init / data order / sampling
  model.llm, model.vision   preset names (moiie_jax/models/presets.py) when training from scratch; ignored for
                            shapes when init.checkpoint is set (the checkpoint's config.json decides them)
  model.variant             dense | vanilla | modality | moiie (the paper's four layer kinds)
  model.experts, .layout    4 or 8 experts; 'balanced' (2+2+4) or 'unbalanced' (3+3+2) for 8 MoIIE experts
  model.moe.*               MoEConfig overrides (top_k, capacity_factor, placement, first_layer, aux_loss_coef, ...)
  model.s2_scales           S2 multi-scale features (models/s2.py): None = as the init checkpoint (off from scratch),
                            () off, (384, 768, 1152) the official scales
  model.dtype               compute dtype (bfloat16 on accelerators; parameters stay float32 masters)
  model.scan_layers, .remat, .remat_policy   execution of the decoder layers (remat_policy: full | minimal | dots,
                            see LLMConfig; the full-size recipes scan their layers and recompute them whole)
  model.attention_causal_blocks   attention without a cache in this many query blocks, each skipping the keys
                            after its last query (2 by default; 1 = every key for every query, as HF computes it)
  init.checkpoint           a converted-checkpoint folder (python -m moiie_jax.convert, or a previous stage's
                            WORKDIR/final); a dense checkpoint is upcycled when model.variant is an MoE kind
  init.fresh_connector      initialise the connector afresh instead of taking the checkpoint's (S2 switched on
                            after a non-S2 stage, as the official scripts do)
  data.*                    moiie_jax.data.pipeline.DataConfig fields (num_image_tokens and image_token_id are
                            filled in from the model)
  optimizer.*               moiie_jax.train.optimizer.get_config fields (stage presets, lrs, schedule, clipping)
  mesh.data/fsdp/expert/tensor  device mesh axis sizes (-1 = the rest). Default fsdp=-1: parameters, gradients and
                            optimizer state sharded over every device, gathered a layer at a time (MaxText's
                            default); data=-1 would replicate them on every device, which no chip holds at full size
  num_epochs, total_steps   total_steps counts optimizer updates; 0 means num_epochs over the data
  log_every, checkpoint_every
                            count micro-steps (one batch of data.batch_size per process each; an update is
                            grad_accum_steps of them), as the progress bar and checkpoint step numbers do
  keep_checkpoints, export_final
"""

from __future__ import annotations

import dataclasses

import ml_collections

from moiie_jax.models import presets
from moiie_jax.models.config import LLMConfig, LVLMConfig, MoEConfig
from moiie_jax.train import optimizer as optimizer_lib

MOE_OVERRIDE_FIELDS = ('top_k', 'renormalize', 'capacity_factor', 'eval_capacity_factor', 'placement',
                       'first_layer', 'layers', 'aux_loss_coef', 'aux_loss_scope', 'z_loss_coef', 'modality_rule',
                       'router_init_std', 'grouped_matmul', 'gate', 'min_capacity', 'gate_noise',
                       'gate_noise_seed')


def load(spec: str) -> ml_collections.ConfigDict:
  """'configs/NAME.py:ARGS' -> get_config(ARGS), as `--config` on the command line reads it."""
  import importlib.util
  import os
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} not found')
  module_spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'variant=modality,experts=8,runlocal=True' -> ConfigDict, typed by the defaults' types.

  A key not in `defaults`, a boolean that is not clearly true or false, or a number that does not parse is a
  ValueError naming the key: a typo must not silently run another experiment (`runlocal=yesplease` read as False
  builds the full-size model).
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    if '=' not in item:
      raise ValueError(f'config arg {item!r}: expected key=value (known keys: {sorted(defaults)})')
    key, value = item.split('=', 1)
    if key not in defaults:
      raise ValueError(f'config arg {key!r}: unknown; known keys: {sorted(defaults)}')
    out[key] = _parse_value(key, value, defaults[key])
  return out


def _parse_value(key: str, value: str, default):
  kind = type(default)
  if kind is bool:
    if value.strip().lower() in _TRUE:
      return True
    if value.strip().lower() in _FALSE:
      return False
    raise ValueError(f'config arg {key}={value!r}: expected a boolean ({"/".join(_TRUE)} or {"/".join(_FALSE)})')
  if default is None:
    return value
  try:
    return kind(value)
  except ValueError:
    raise ValueError(f'config arg {key}={value!r}: expected {kind.__name__} (like the default {default!r})') from None


def base_config(stage: str = 'stage2') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(
      llm='phi3-mini', vision='siglip-so400m-384', variant='moiie', experts=4, layout='balanced',
      moe=ml_collections.ConfigDict(dict(top_k=2, capacity_factor=0.0, placement='interleaved', first_layer=1,
                                         aux_loss_coef=0.001, aux_loss_scope='global', z_loss_coef=0.0,
                                         modality_rule='all_image')),
      vision_feature_layer=-2, s2_scales=None, dtype='bfloat16', scan_layers=False, remat=False, remat_policy='full',
      attention_causal_blocks=2, vocab_size=0))  # 0 = the preset's (from-scratch models size it to their tokenizer)
  c.init = ml_collections.ConfigDict(dict(checkpoint='', fresh_connector=False))
  # Device mesh (moiie_jax/parallel/mesh.py): -1 = the rest of the devices. Experts are split over `expert`,
  # parameters FSDP-style over `fsdp` (and `expert` for non-expert weights), the batch over data x fsdp x expert.
  # FSDP over everything by default: fp32 masters + Adam state are 16 bytes per parameter (~125 GB for Phi-3
  # MoIIE), so replicating them (data=-1) fits no chip; sharded they are ~4 GB per chip on 32 chips.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
  c.mesh_devices = 0  # 0 = every device of every process; n = only this process's first n (single-host runs)
  c.data = ml_collections.ConfigDict(dict(
      json_path='', image_folder='', tfds_dir='', tokenizer_path='', template='phi3', max_length=4096,
      truncation='drop', length_buckets=(), batch_size=8, worker_count=0, on_error='skip', shuffle=True,
      # The image recipe (size, resize, mean/std) follows the model's tower; pad-to-square as Bunny/MoIIE do.
      pad_to_square=True,
      synthetic_demo=False))  # True: generate the shapes demo data in WORKDIR/data (runlocal forms)
  c.optimizer = optimizer_lib.get_config(stage)
  c.global_batch_size = 0  # > 0: grad_accum_steps = global / (data.batch_size * processes)
  c.num_epochs = 1
  c.total_steps = 0
  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.export_final = True
  return c


def moe_from_config(model: ml_collections.ConfigDict) -> MoEConfig:
  overrides = {k: (tuple(v) if k == 'layers' else v) for k, v in model.moe.items() if k in MOE_OVERRIDE_FIELDS}
  unknown = sorted(set(model.moe.keys()) - set(MOE_OVERRIDE_FIELDS))
  if unknown:
    raise ValueError(f'config.model.moe: unknown keys {unknown}; expected some of {list(MOE_OVERRIDE_FIELDS)}')
  return presets.moe_config(model.variant, model.experts, model.layout, **overrides)


def model_config(config: ml_collections.ConfigDict, base: LVLMConfig | None = None) -> LVLMConfig:
  """The LVLMConfig a recipe trains: shapes from `base` (a checkpoint's config) or the presets, MoE and
  execution fields from the recipe."""
  m = config.model
  llm_exec = dict(moe=moe_from_config(m), dtype=m.dtype, scan_layers=m.scan_layers, remat=m.remat,
                  remat_policy=m.remat_policy,
                  attention_causal_blocks=int(m.get('attention_causal_blocks', LLMConfig.attention_causal_blocks)))
  if base is None:
    if m.get('vocab_size', 0):
      llm_exec['vocab_size'] = int(m.vocab_size)
    cfg = presets.lvlm_config(m.llm, m.vision, vision_feature_layer=m.vision_feature_layer, **llm_exec)
  else:
    cfg = dataclasses.replace(base, llm=dataclasses.replace(base.llm, **llm_exec))
  vision = dict(dtype=m.dtype)
  if m.get('s2_scales') is not None:
    vision['s2_scales'] = tuple(int(s) for s in m.s2_scales)
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **vision))
  cfg.validate()
  return cfg


VISION_TOWERS = {'siglip': ('siglip-so400m-384', 'tiny-siglip'), 'clip': ('clip-l-336', 'tiny-clip')}
S2_CHOICES = ('auto', 'on', 'off', 'official')


def s2_scales(tower: str) -> tuple[int, ...]:
  """The official S2 scales (384, 768, 1152) for a preset tower: its size, twice and three times it."""
  size = presets.VISION_PRESETS[tower].image_size
  return (size, 2 * size, 3 * size)


def paper_recipe(a: ml_collections.ConfigDict, *, llm: str, template: str) -> ml_collections.ConfigDict:
  """The MoIIE paper's training recipe for one stage (arguments as parsed by the configs/ files).

  Stage 1: connector only (lr 1e-3; the official script uses 5e-4), global batch 256, max length 2048, dense.
  Stage 2: sparse upcycling + everything trains (2e-5, vision tower 2e-6), global batch 128, max length 4096.
  With three_stage: stage 2 is dense SFT of LLM + connector (tower frozen), stage 3 upcycles and trains only the
  experts and routers (paper Table 3; MoE-LLaVA's pipeline).

  S2 multi-scale features (`a.s2`): 'on' in every stage, so stage 1's connector (3 x 1152 wide) carries over;
  'official' as the authors' scripts do it: stage 1 without S2, then S2 from stage 2 on with a connector trained
  from scratch there; 'off'; 'auto' (the default) follows the init checkpoint (a converted folder is non-S2
  unless converted with --s2 or from an S2 Bunny folder). The paper's stage 2 uses S2; the default stays 'auto'
  (off for a fresh conversion) while the full-size fit roster (bench/RESULTS.md) is compiled without it; S2 runs
  the tower on 14 tiles per image.
  """
  if a.vision not in VISION_TOWERS:
    raise ValueError(f'config arg vision={a.vision!r}: expected one of {sorted(VISION_TOWERS)}')
  if a.stage not in (1, 2, 3) or (a.stage == 3 and not a.three_stage):
    raise ValueError(f'config arg stage={a.stage}: expected 1 or 2 (or 3 with three_stage=True)')
  moe_stage = 3 if a.three_stage else 2
  s2 = str(a.get('s2', 'auto')).lower()
  s2 = {'true': 'on', '1': 'on', 'false': 'off', '0': 'off'}.get(s2, s2)
  if s2 not in S2_CHOICES:
    raise ValueError(f'config arg s2={a.s2!r}: expected one of {list(S2_CHOICES)}')
  if s2 != 'auto' and a.vision != 'siglip':
    raise ValueError(f'config arg s2={a.s2!r} with vision={a.vision!r}: S2 features are built for the SigLIP tower')
  opt_stage = {1: 'stage1', 2: 'sft_dense' if a.three_stage else 'stage2', 3: 'moe_only'}[a.stage]
  c = base_config(opt_stage)
  full, tiny = VISION_TOWERS[a.vision]
  c.model.llm = llm
  c.model.vision = full
  c.model.variant = a.variant if a.stage >= moe_stage else 'dense'
  c.model.experts = a.experts
  c.model.layout = a.layout
  c.model.moe.placement = a.placement
  c.model.moe.aux_loss_coef = a.aux
  c.data.template = template
  c.data.max_length = 2048 if a.stage == 1 else 4096
  c.data.pad_to_square = True
  if a.stage == 1:
    c.data.template = 'plain'
  c.global_batch_size = 256 if a.stage == 1 else 128
  c.data.batch_size = 8  # per process; grad_accum_steps = global / (batch_size * processes)
  c.model.dtype = 'bfloat16'
  # Full size: layers scanned (one compiled layer body, parameters stacked; a looped checkpoint is relaid out on
  # load) and recomputed whole in the backward pass (remat_policy='full': least memory; 'minimal' keeps the
  # weight matmuls' outputs where a slice has HBM to spare).
  c.model.scan_layers = True
  c.model.remat = True
  c.model.remat_policy = 'full'
  tower = tiny if a.runlocal else full
  if s2 == 'on' or (s2 == 'official' and a.stage >= 2):
    c.model.s2_scales = s2_scales(tower)
    # The connector's input widens to 3 x the tower's: trained from scratch where S2 starts (stage 1 always
    # starts from a fresh connector; 'official' switches S2 on at stage 2).
    c.init.fresh_connector = a.stage == 1 or (s2 == 'official' and a.stage == 2)
  elif s2 == 'off' or (s2 == 'official' and a.stage == 1):
    c.model.s2_scales = ()
  if a.runlocal:
    c.model.llm = presets.TINY_LLM[llm]
    c.model.vision = tiny
    c.model.dtype = 'float32'
    c.model.remat = False
    c.model.scan_layers = False
    c.data.synthetic_demo = True  # the loop generates the shapes data set in WORKDIR/data
    c.data.template = 'demo'
    c.data.max_length = 96
    c.data.pad_to_square = False
    c.data.batch_size = 4
    c.global_batch_size = 8
    c.total_steps = 4
    c.log_every = 2
    c.mesh_devices = 1
  return c
