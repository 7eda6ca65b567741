"""The web chat (Gradio) and its JSON route, on one FastAPI app.

Page: checkpoint folder and Load; an image (uploaded as a file, shown as a preview); the chat in the checkpoint's
template, answers streamed token by token, Stop and Clear; sampling controls (greedy by default); the routing view
of the last answer and its prompt (tokens coloured by top expert group at a chosen MoE layer or averaged, per
expert on hover; image tokens as a heat map over the patch grid); a status line where every error shows.
Route: POST /api/generate (JSON in, JSON out; 400 with {"error"} for a bad request), GET /api/info.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from moiie_jax.infer.generate import PromptError, SamplingConfig
from moiie_jax.serve import routing_view
from moiie_jax.serve.session import ChatEngine, CheckpointError, RequestError, RoutingData, read_image

MAX_NEW_TOKENS = 1024


def _error(e: Exception) -> str:
  return f'**Error:** {e}'


def _new_conversation(image=None) -> dict:
  """The per-browser-session state: the image, the (question, answer) turns, and the last reply."""
  return {'image': image, 'turns': [], 'last': None}


def build_blocks(engine: ChatEngine, *, default_max_new_tokens: int = 128) -> gr.Blocks:
  with gr.Blocks(title='moiie_jax chat') as blocks:
    conv = gr.State(_new_conversation())
    routing = gr.State(None)
    gr.Markdown('## moiie_jax chat\nAsk about an image; the routing view below shows which experts each token of '
                'the last answer and its prompt went to.')
    with gr.Row():
      with gr.Column(scale=1):
        with gr.Row():
          folder = gr.Textbox(value=engine.folder or '', label='Checkpoint folder', elem_id='checkpoint', scale=4)
          load = gr.Button('Load', elem_id='load', scale=1)
        model_info = gr.Markdown(engine.describe(), elem_id='model-info')
        image_file = gr.File(label='Image', file_types=['image'], type='filepath', elem_id='image')
        preview = gr.Image(label='Image preview', interactive=False, elem_id='preview', height=240)
        with gr.Accordion('Sampling', open=False):
          max_new = gr.Slider(1, MAX_NEW_TOKENS, value=default_max_new_tokens, step=1, label='Max new tokens',
                              elem_id='max-new-tokens')
          temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label='Temperature (0 = greedy)',
                                  elem_id='temperature')
          top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label='Top-p', elem_id='top-p')
          seed = gr.Number(value=0, precision=0, label='Seed', elem_id='seed')
      with gr.Column(scale=2):
        chatbot = gr.Chatbot(label='Chat', elem_id='chatbot', height=420, render_markdown=False,
                             feedback_options=None)
        question = gr.Textbox(label='Message', placeholder='Ask about the image', elem_id='question', lines=2)
        with gr.Row():
          send = gr.Button('Send', variant='primary', elem_id='send')
          stop = gr.Button('Stop', elem_id='stop')
          clear = gr.Button('Clear', elem_id='clear')
    status = gr.Markdown('' if engine.generator else _error(engine.load_error or 'no checkpoint loaded'),
                         elem_id='status')
    gr.Markdown('### Routing view')
    layer = gr.Slider(0, max(engine.num_moe_layers, 1), value=0, step=1, elem_id='layer',
                      label='MoE layer (0 = averaged over the MoE layers)')
    with gr.Row():
      tokens_view = gr.HTML(elem_id='routing', scale=2)
      heat = gr.Image(label='Image tokens (patch grid)', interactive=False, elem_id='heatmap', scale=1, height=336)

    def on_load(path):
      try:
        engine.load(path)
      except CheckpointError as e:
        return engine.describe(), _error(e), gr.update(), _new_conversation(), [], None
      return (engine.describe(), f'Loaded {path}.', gr.update(maximum=max(engine.num_moe_layers, 1), value=0),
              _new_conversation(), [], None)

    load.click(on_load, folder, [model_info, status, layer, conv, chatbot, routing])

    def on_image(path):
      if not path:
        return None, _new_conversation(), [], ''
      try:
        img = read_image(path, f'image {path.rsplit("/", 1)[-1]!r}')
      except PromptError as e:
        return None, _new_conversation(), [], _error(e)
      return img, _new_conversation(img), [], 'Image loaded; the conversation starts over.'

    image_file.change(on_image, image_file, [preview, conv, chatbot, status])

    def respond(message, state, history, max_new_tokens, temp, p, seed_value):
      history = list(history or [])
      try:
        sampling = SamplingConfig(temperature=float(temp), top_p=float(p), seed=int(seed_value or 0))
        stream = engine.stream(message, state['image'], state['turns'], int(max_new_tokens), sampling)
        reply = next(stream)  # the errors of a bad message come before the first token
      except (PromptError, CheckpointError, ValueError) as e:
        yield history, state, _error(e), gr.update()
        return
      except StopIteration:
        yield history, state, _error('no tokens were generated'), gr.update()
        return
      shown = history + [{'role': 'user', 'content': message}, {'role': 'assistant', 'content': reply.text}]
      turns = list(state['turns'])
      # Every update carries the answer so far as the turn's answer: a stopped answer stays in the conversation.
      yield shown, {**state, 'turns': turns + [(message, reply.text)], 'last': reply}, 'Answering...', ''
      for reply in stream:
        shown[-1] = {'role': 'assistant', 'content': reply.text}
        yield shown, {**state, 'turns': turns + [(message, reply.text)], 'last': reply}, 'Answering...', gr.update()
      state = {**state, 'turns': turns + [(message, reply.text)], 'last': reply}
      rate = len(reply.tokens) / reply.seconds if reply.seconds else 0.0
      yield shown, state, f'Answered: {len(reply.tokens)} tokens in {reply.seconds:.1f} s ({rate:.1f} tokens/s).', ''

    def show_routing(state, layer_value):
      reply = state.get('last') if state else None
      if reply is None or reply.prompt_ids is None:
        return None, '', None
      try:
        data = engine.routing(reply)
      except (CheckpointError, ValueError) as e:
        return None, _error(e), None
      return (data, *_draw(data, layer_value))

    def _draw(data: RoutingData | None, layer_value) -> tuple[str, Any]:
      if data is None:
        return '', None
      k = int(layer_value or 0)
      sel = None if k == 0 or data.routing is None else min(k, len(data.routing.layers)) - 1
      return (routing_view.tokens_html(data.routing, data.pieces, data.kinds, sel),
              routing_view.heatmap(data.routing, data.image, sel))

    inputs = [question, conv, chatbot, max_new, temperature, top_p, seed]
    outputs = [chatbot, conv, status, question]
    events = [trigger(respond, inputs, outputs).then(show_routing, [conv, layer], [routing, tokens_view, heat])
              for trigger in (send.click, question.submit)]
    stop.click(None, None, None, cancels=events).then(show_routing, [conv, layer], [routing, tokens_view, heat])
    layer.change(_draw, [routing, layer], [tokens_view, heat])
    clear.click(lambda state: (_new_conversation(state['image']), [], '', None, '', None), conv,
                [conv, chatbot, status, routing, tokens_view, heat])
  return blocks


def build_app(engine: ChatEngine, **kwargs) -> FastAPI:
  """The FastAPI app: the JSON routes, and the page mounted at /."""
  app = FastAPI(title='moiie_jax chat')

  @app.get('/api/info')
  def info():
    return {'checkpoint': engine.folder, 'model': engine.describe(), 'moe_layers': engine.num_moe_layers}

  @app.post('/api/generate')
  async def api_generate(request: Request):
    try:
      body = await request.json()
    except ValueError as e:
      return JSONResponse({'error': f'request body: expected JSON ({e})'}, status_code=400)
    try:
      # Generation is blocking work: off the event loop, so the page keeps being served meanwhile.
      from starlette.concurrency import run_in_threadpool  # pylint: disable=g-import-not-at-top
      return await run_in_threadpool(engine.api_generate, body)
    except RequestError as e:
      return JSONResponse({'error': str(e)}, status_code=400)
    except CheckpointError as e:
      return JSONResponse({'error': str(e)}, status_code=409)

  blocks = build_blocks(engine, **kwargs)
  return gr.mount_gradio_app(app, blocks.queue(default_concurrency_limit=1), path='/', css=routing_view.CSS)
