"""The paper's comparison as one experiment: `python -m moiie_jax.study --config configs/study.py:table=1 --workdir D`.

    table=1   Table 1: Dense, Vanilla MoE, Modality MoE, MoIIE (4 experts, top-2, interleaved, aux 0.01)
    table=4   Table 4's ablations of MoIIE: 4 vs 8 experts (balanced 2+2+4 / unbalanced 3+3+2), every layer vs
              interleaved, aux coefficient 0.1 / 0.001 against 0.01
    seeds=3   stage-2 seeds per arm (each changes the routers' initialisation and the data order, the same for
              every arm); one stage 1 is shared by all arms and seeds
    quick=True  tiny shapes, 2 arms (dense, moiie), 1 seed, a few steps: the CI check of the whole pipeline
    recipe=demo  the recipe the arms vary: `demo` (configs/demo.py: tiny SigLIP-shaped tower and LLaMA-shaped
              decoder from scratch, on the synthetic task of data/synthetic.make_study_dataset), or a full-size
              one (`phi3_mini_moiie`, `llama3_8b_moiie`) with `data=files`, `init=` the converted checkpoint and
              `stage1_json=`, `stage2_json=`, `eval_json=` (LLaVA records, each with a "kind"), `image_folder=`,
              and `tokenizer=` (a folder with tokenizer.json; default: the init checkpoint's, required when the
              recipe trains from scratch, as `demo` does)

Every arm is the recipe's stage-2 config plus the arm's overrides (dotted keys, listed in `arms`), so the study
varies exactly what the paper's table varies and nothing else. Activated compute: the MoE arms route every token to
top-2 of 4 experts (2 FFNs per token); the Dense arm runs the one FFN it started from, as in the paper, where Dense
is the backbone the MoE models are upcycled from.
"""

import ml_collections

from moiie_jax.train import recipe

TABLES = {
    1: {'dense': {'model.variant': 'dense'},
        'vanilla': {'model.variant': 'vanilla'},
        'modality': {'model.variant': 'modality'},
        'moiie': {'model.variant': 'moiie'}},
    4: {'moiie-4': {'model.variant': 'moiie'},
        'moiie-8-balanced': {'model.variant': 'moiie', 'model.experts': 8, 'model.layout': 'balanced'},
        'moiie-8-unbalanced': {'model.variant': 'moiie', 'model.experts': 8, 'model.layout': 'unbalanced'},
        'moiie-all-layers': {'model.variant': 'moiie', 'model.moe.placement': 'all'},
        'moiie-aux-0.1': {'model.variant': 'moiie', 'model.moe.aux_loss_coef': 0.1},
        'moiie-aux-0.001': {'model.variant': 'moiie', 'model.moe.aux_loss_coef': 0.001}},
}
QUICK_ARMS = {1: ('dense', 'moiie'), 4: ('moiie-4', 'moiie-8-balanced')}


def get_config(arg: str | None = None):
  a = recipe.parse_arg(arg, table=1, seeds=3, quick=False, recipe='demo', data='synthetic', init='',
                       stage1_json='', stage2_json='', eval_json='', image_folder='', tokenizer='')
  if a.table not in TABLES:
    raise ValueError(f'config arg table={a.table}: expected one of {sorted(TABLES)} (the paper\'s Table 1 or 4)')
  if a.data not in ('synthetic', 'files'):
    raise ValueError(f'config arg data={a.data!r}: expected synthetic or files')
  c = ml_collections.ConfigDict()
  c.table = a.table
  names = QUICK_ARMS[a.table] if a.quick else tuple(TABLES[a.table])
  # (arm, ((dotted field, value), ...)) pairs: ConfigDict keys cannot hold the dots of field paths or arm names.
  c.arms = tuple((name, tuple(TABLES[a.table][name].items())) for name in names)
  c.seeds = [0] if a.quick else list(range(a.seeds))
  c.recipe = f'configs/{a.recipe}.py'
  c.quick = a.quick
  # init: the converted checkpoint stage 1 starts from (a full-size recipe); the demo recipe starts from scratch.
  quick_steps = 6  # per stage in the quick form
  c.stage1 = ml_collections.ConfigDict(dict(steps=quick_steps if a.quick else 400, seed=0, init=a.init))
  # Stage 2: 1000 steps. At 500 the arms were at 0.58-0.61 overall, still learning the visual and text kinds; one
  # MoIIE run of 1500 steps reached visual 0.91, text 1.00, binding 0.32 (chance 0.23). With 1000, table=1 (12
  # runs) took 51 min on 2 shared CPU cores, and 31 min after the demo recipe's shorter buckets and the causal
  # attention blocks (bench/RESULTS.md). 1500 would take ~45 min by that run's per-step times: not yet measured.
  c.stage2 = ml_collections.ConfigDict(dict(steps=quick_steps if a.quick else 1000))
  # Overrides of every stage (both stages, every arm), as (dotted field, value) pairs. The quick form keeps the CI
  # check short with smaller batches, one length bucket (one compiled step per stage instead of one per bucket its
  # batches hit) and one checkpoint per run, at its end (the study saves at half its steps too); the code paths are
  # the same.
  c.overrides = ((('data.batch_size', 8), ('data.length_buckets', (64,)), ('checkpoint_every', quick_steps))
                 if a.quick else ())
  c.data = ml_collections.ConfigDict(dict(
      source=a.data, seed=0, n_train=48 if a.quick else 1200, n_eval=12 if a.quick else 300, image_size=32,
      # data=files: LLaVA JSON files for stage 1 and stage 2, and an eval file whose records carry a "kind"
      # (accuracy is exact match of the greedy answer with the first reply, per kind); plus the images' folder and
      # the tokenizer ('' = the init checkpoint's; a from-scratch recipe's model is sized to it).
      files=ml_collections.ConfigDict(dict(stage1_json=a.stage1_json, stage2_json=a.stage2_json,
                                           eval_json=a.eval_json, image_folder=a.image_folder,
                                           tokenizer=a.tokenizer))))
  c.eval = ml_collections.ConfigDict(dict(max_new_tokens=4, batch_size=16 if a.quick else 64, routing_items=12 if
                                          a.quick else 150))
  return c
