"""MoE-LLaVA's recipe: vanilla MoE (4 shared experts, one router), DeepSpeed's top-2 gate, MoE in even layers,
capacity factor 1.5 in training and 2.0 at evaluation (overflow dropped), GShard aux loss summed over layers with
coefficient 0.01, three stages:

    stage=1  connector only, lr 1e-3, batch 256
    stage=2  LLM + connector (dense SFT), lr 2e-5, batch 128
    stage=3  upcycle, then experts + routers only, lr 2e-5, batch 128
    sequences of up to 2048 tokens in every stage (its scripts' model_max_length; Phi-2's whole context)

    llm=phi2 | stablelm2 | qwen1.8b        its released backbones (Phi2-2.7B-4e, StableLM-1.6B-4e, Qwen-1.8B-4e)
    llm=phi3-mini | llama3-8b              our backbones, for a like-for-like comparison with MoIIE
    vision=clip (its CLIP-L-336) | siglip (its -384 models)
    gate=deepspeed (default: MoE-LLaVA's) | mixtral (ours: padding not routed, Mixtral aux loss over both choices)

The gate (`MoEConfig.gate='deepspeed'`) follows DeepSpeed's top2gating: softmax over every position of the
flattened batch (padding included), capacity max(ceil(2 * S / E * cf), min_capacity), first choices before second
choices, the kept weights renormalised after the drop, aux loss E * sum_e mean_gate_e * first_choice_fraction_e
per layer, summed over layers. One difference, on purpose: the second choice is the plain argmax
(`gate_noise='none'`), so training and evaluation are deterministic; MoE-LLaVA draws it with Gumbel noise, at
evaluation too, so its scores vary run to run (its issue #60). `noise=gumbel` (MoEConfig.gate_noise='gumbel',
seeded by gate_noise_seed) reproduces DeepSpeed's draw, reproducibly for a seed. Generation and evaluation run at
eval_capacity_factor 2.0 here as in MoE-LLaVA only when asked
(`--capacity-factor 2.0` on `moiie_jax.generate` / `moiie_jax.evaluate`); by default they are dropless.
"""

from moiie_jax.train import recipe

LLMS = ('phi2', 'stablelm2-1.6b', 'qwen-1.8b', 'phi3-mini', 'llama3-8b')
ALIASES = {'stablelm2': 'stablelm2-1.6b', 'qwen1.8b': 'qwen-1.8b', 'qwen': 'qwen-1.8b', 'stablelm': 'stablelm2-1.6b'}
# The chat template of each backbone: MoE-LLaVA uses one text layout for its three; ours keep their own.
TEMPLATES = {'phi2': 'moe_llava', 'stablelm2-1.6b': 'moe_llava', 'qwen-1.8b': 'moe_llava', 'phi3-mini': 'phi3',
             'llama3-8b': 'llama3'}


def get_config(arg: str | None = None):
  a = recipe.parse_arg(arg, stage=3, llm='phi2', vision='clip', gate='deepspeed', noise='none', runlocal=False)
  a.llm = ALIASES.get(a.llm, a.llm)
  if a.llm not in LLMS:
    raise ValueError(f'config arg llm={a.llm!r}: expected one of {list(LLMS)}')
  if a.gate not in ('deepspeed', 'mixtral'):
    raise ValueError(f'config arg gate={a.gate!r}: expected deepspeed or mixtral')
  args = recipe.parse_arg(None, stage=2, variant='vanilla', experts=4, layout='balanced', placement='interleaved',
                          aux=0.01, vision='siglip', three_stage=True, runlocal=False)
  args.update(dict(stage=a.stage, vision=a.vision, runlocal=a.runlocal))
  c = recipe.paper_recipe(args, llm=a.llm, template=TEMPLATES[a.llm])
  if not a.runlocal:
    c.data.max_length = 2048  # its scripts' model_max_length, every stage (Phi-2's whole context)
  c.model.moe.first_layer = 0  # even layers
  c.model.moe.capacity_factor = 1.5
  c.model.moe.eval_capacity_factor = 2.0
  c.model.moe.gate = a.gate
  c.model.moe.min_capacity = 0
  if a.noise not in ('none', 'gumbel') or (a.noise == 'gumbel' and a.gate != 'deepspeed'):
    raise ValueError(f'config arg noise={a.noise!r}: expected none, or gumbel with gate=deepspeed')
  c.model.moe.gate_noise = a.noise
  c.model.moe.gate_noise_seed = 0
  if a.gate == 'deepspeed':
    c.model.moe.aux_loss_scope = 'sum'  # DeepSpeed adds each layer's l_aux
  return c
