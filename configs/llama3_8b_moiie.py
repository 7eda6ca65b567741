"""The paper's larger backbone: LLaMA-3-8B + SigLIP-so400m-384 (or CLIP-L-336), MoIIE (11.3B activated).

Same arguments as configs/phi3_mini_moiie.py (stage, variant, experts, layout, placement, aux, vision,
three_stage, runlocal); the chat template is Bunny's `llama` (EOS <|end_of_text|>, pad = EOS).
"""

from moiie_jax.train import recipe


def get_config(arg: str | None = None):
  a = recipe.parse_arg(arg, stage=2, variant='moiie', experts=4, layout='balanced', placement='interleaved',
                       aux=0.001, vision='siglip', three_stage=False, s2='auto', runlocal=False)
  return recipe.paper_recipe(a, llm='llama3-8b', template='llama3')
