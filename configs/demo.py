"""The embedded demo (the README's main job): shapes VQA, tiny SigLIP-shaped tower + tiny LLaMA-shaped decoder.

    get_config('stage=1')  trains everything from scratch on the captions split (the demo has no pretrained
                           weights, so unlike the paper's stage 1 the tower and decoder learn too)
    get_config('stage=2')  upcycles the stage-1 model to MoIIE (1 vision + 1 language + 2 shared experts, top-2,
                           interleaved) and trains everything on the question-answer split

`python -m moiie_jax.demo` generates the data, runs both stages and prints the held-out accuracy.
Paths (data, tokenizer, init checkpoint) are filled in by moiie_jax.demo.
"""

from moiie_jax.train import recipe


def get_config(arg: str | None = None):
  a = recipe.parse_arg(arg, stage=1, variant='moiie', steps=0, batch_size=32)
  c = recipe.base_config('stage2')
  c.seed = 0
  c.model.llm = 'tiny-llama'
  c.model.vision = 'tiny-siglip'
  c.model.variant = 'dense' if a.stage == 1 else a.variant
  c.model.experts = 4
  c.model.dtype = 'float32'
  c.model.vision_feature_layer = -1  # a from-scratch tower: use its last layer
  c.model.moe.aux_loss_coef = 0.01
  c.data.template = 'demo'
  c.data.max_length = 96
  # Pad each batch to the smallest bucket that fits it: every bucket a batch uses compiles the step once, and a
  # shorter one saves more than its share (attention's score tensors shrink with the square of the length).
  # Measured on the demo's data (seed 0): captions are 33-39 tokens (16 of them the image's), questions 49-87;
  # the study's task (configs/study.py, the same recipe): captions 33-40, questions 39-45. So 40, 48 and 88.
  c.data.length_buckets = (40, 48, 64, 88, 96)
  c.data.batch_size = a.batch_size
  c.data.pad_to_square = False
  c.data.worker_count = 0
  # From scratch: every group learns at a high lr in both stages (the paper's 1e-3 / 2e-5 / 2e-6 are for
  # pretrained towers and LLMs).
  for group in ('vision_tower', 'multi_modal_projector', 'language_model', 'experts', 'routers'):
    c.optimizer.lr[group] = 2e-3 if a.stage == 1 else 1e-3
  c.optimizer.warmup_ratio = 0.05
  c.optimizer.grad_clip = 1.0
  c.num_epochs = 1
  c.total_steps = a.steps or (600 if a.stage == 1 else 1200)
  c.log_every = 25
  c.checkpoint_every = 300
  c.keep_checkpoints = 2
  return c
