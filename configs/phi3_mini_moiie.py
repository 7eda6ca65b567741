"""The paper's main recipe: Phi-3-mini + SigLIP-so400m-384 (or CLIP-L-336), 2-layer MLP connector, MoIIE.

    --config configs/phi3_mini_moiie.py:stage=1                    connector only, lr 1e-3, global batch 256
    --config configs/phi3_mini_moiie.py:stage=2                    upcycle + everything, 2e-5 (tower 2e-6), batch 128
    --config configs/phi3_mini_moiie.py:stage=2,variant=vanilla    the paper's rivals: dense | vanilla | modality
    --config configs/phi3_mini_moiie.py:stage=2,experts=8,layout=unbalanced   Table 4: 8 experts (2+2+4 / 3+3+2)
    --config configs/phi3_mini_moiie.py:stage=2,placement=all      Table 4: MoE in every layer
    --config configs/phi3_mini_moiie.py:stage=2,aux=0.01           Table 4: load-balance coefficient ablation
    --config configs/phi3_mini_moiie.py:stage=2,vision=clip        Appendix A.4: CLIP ViT-L/14-336
    --config configs/phi3_mini_moiie.py:stage=1,s2=on              S2 multi-scale SigLIP features in both stages
                                                                   (s2=official: from stage 2, fresh connector, as
                                                                   the authors' scripts; default auto: as the init
                                                                   checkpoint, so off for a plain conversion)
    --config configs/phi3_mini_moiie.py:stage=2,three_stage=True   Table 3: dense SFT, then stage=3 MoE-only
    ...,runlocal=True                                              tiny shapes and the synthetic demo data: seconds

Stage 2 needs `--config.init.checkpoint=STAGE1_WORKDIR/final`; stage 1 needs a converted checkpoint
(`python -m moiie_jax.convert --llm Phi-3-mini --vision siglip --out DIR`) and LLaVA-format data
(`--config.data.json_path`, `--config.data.image_folder`).
"""

from moiie_jax.train import recipe


def get_config(arg: str | None = None):
  a = recipe.parse_arg(arg, stage=2, variant='moiie', experts=4, layout='balanced', placement='interleaved',
                       aux=0.001, vision='siglip', three_stage=False, s2='auto', runlocal=False)
  return recipe.paper_recipe(a, llm='phi3-mini', template='phi3')
