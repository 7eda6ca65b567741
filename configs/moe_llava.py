"""MoE-LLaVA's recipe on our backbones: vanilla MoE (4 shared experts, one router), top-2, MoE in even layers,
capacity factor 1.5 in training (2.0 at evaluation, overflow dropped), aux coefficient 0.01, three stages:

    stage=1  connector only, lr 1e-3, batch 256
    stage=2  LLM + connector (dense SFT), lr 2e-5, batch 128
    stage=3  upcycle, then experts + routers only, lr 2e-5, batch 128

Differences from MoE-LLaVA's code, on purpose: (1) routing at evaluation is deterministic (MoE-LLaVA draws the
second expert with Gumbel noise, also at evaluation, so its scores vary run to run), and generation and
evaluation run dropless by default (`--capacity-factor 2.0` on `moiie_jax.generate` / `moiie_jax.evaluate`
reproduces MoE-LLaVA's evaluation capacity, at the price of answers that depend on the batch); (2) the aux loss is the
Mixtral form E * sum_e f_e P_e over both top-k choices (MoE-LLaVA uses DeepSpeed's GShard form, first choices
only, E^2 * mean(me * ce), summed over layers; both equal their minimum under uniform routing); (3) its Phi-2,
StableLM and Qwen backbones are not among our decoders: pick llm=phi3-mini or llm=llama3-8b, vision=clip (its
CLIP-L-336) or siglip (its -384 models).
"""

from moiie_jax.train import recipe


def get_config(arg: str | None = None):
  a = recipe.parse_arg(arg, stage=3, llm='phi3-mini', vision='clip', runlocal=False)
  template = 'phi3' if a.llm == 'phi3-mini' else 'llama3'
  args = recipe.parse_arg(None, stage=2, variant='vanilla', experts=4, layout='balanced', placement='interleaved',
                          aux=0.01, vision='siglip', three_stage=True, runlocal=False)
  args.update(dict(stage=a.stage, vision=a.vision, runlocal=a.runlocal))
  c = recipe.paper_recipe(args, llm=a.llm, template=template)
  c.model.moe.first_layer = 0  # even layers
  c.model.moe.capacity_factor = 1.5
  c.model.moe.eval_capacity_factor = 2.0
  return c
