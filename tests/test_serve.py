"""The web chat (`python -m moiie_jax.serve`) on a tiny checkpoint made here: driven in headless Chromium (upload an
image, ask, wait for the streamed answer; the answer equals `python -m moiie_jax.generate`'s greedy one and the
routing view shows one coloured span per answer token; bad input shows in the page and the server keeps running),
its JSON endpoint (same answer; 4xx with a message for bad requests), and the routing view's drawing.

The browser test needs Debian's `chromium` and `chromium-driver` (.ci/run's test command installs them); without
them it is skipped on a developer's machine and fails under CI (CI=true), where it must run.
"""

import base64
import json
import os
import shutil
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from moiie_jax import generate as generate_cli
from moiie_jax.convert import folder
from moiie_jax.evaluate.token_routing import GROUPS, TokenRouting
from moiie_jax.models.lvlm import LVLM
from moiie_jax.serve import routing_view
from test_generate import tiny_config, write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 6
QUESTION = 'What is in the image?'
CHROMEDRIVER = shutil.which('chromedriver')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _printable_checkpoint(path: str, tok_dir: str) -> None:
  """The tiny MoIIE checkpoint, its output layer limited to tokens of letters and spaces (a random model would
  answer in control bytes, which a page shows differently from a terminal)."""
  cfg = tiny_config()
  model = LVLM(cfg, rngs=nnx.Rngs(1))
  tok = json.load(open(os.path.join(tok_dir, 'tokenizer.json')))['model']['vocab']
  readable = np.zeros(cfg.llm.vocab_size, bool)
  for piece, i in tok.items():
    text = piece.replace('\u0120', ' ')
    readable[i] = text.strip() != '' and all(c in string.ascii_letters + ' ' for c in text)
  kernel = model.language_model.lm_head.kernel
  kernel.set_value(np.where(readable[None, :], np.asarray(kernel.get_value()), 0.0).astype(np.float32))
  folder.save_folder(path, cfg, nnx.state(model, nnx.Param), tokenizer_dir=tok_dir,
                     meta={'template': 'demo', 'source': 'test'})


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp('serve')
  ckpt = str(root / 'ckpt')
  _printable_checkpoint(ckpt, write_tokenizer(str(root / 'tok')))
  pixels = np.zeros((48, 40, 3), np.uint8)
  pixels[...] = (30, 60, 200)
  pixels[10:30, 8:28] = (220, 30, 30)  # a red square on a blue background
  Image.fromarray(pixels).save(root / 'cat.png')
  (root / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  port = _free_port()
  log = open(root / 'server.log', 'w')
  proc = subprocess.Popen([sys.executable, '-m', 'moiie_jax.serve', '--checkpoint', ckpt, '--port', str(port),
                           '--max-new-tokens', str(MAX_NEW)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  try:
    deadline = time.time() + 180
    while True:
      try:
        with urllib.request.urlopen(url + '/api/info', timeout=5) as r:
          info = json.load(r)
        break
      except (urllib.error.URLError, ConnectionError):
        if proc.poll() is not None or time.time() > deadline:
          raise RuntimeError('the server did not start: ' + open(root / 'server.log').read()[-3000:])
        time.sleep(0.5)
    assert info['checkpoint'] == ckpt and info['moe_layers'] == 1
    yield {'url': url, 'root': root, 'ckpt': ckpt, 'proc': proc}
  finally:
    proc.terminate()
    proc.wait(30)
    log.close()


def _post(url: str, body) -> tuple[int, dict]:
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  req = urllib.request.Request(url + '/api/generate', data=data, headers={'Content-Type': 'application/json'})
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, json.load(r)
  except urllib.error.HTTPError as e:
    return e.code, json.load(e)


def _cli_answer(server, capsys) -> str:
  rc = generate_cli.main(['--checkpoint', server['ckpt'], '--image', str(server['root'] / 'cat.png'),
                          '--prompt', QUESTION, '--max-new-tokens', str(MAX_NEW)])
  out, err = capsys.readouterr()
  assert rc == 0, err
  return out[:-1]  # the answer and a newline


def test_json_endpoint(server, capsys):
  image = base64.b64encode((server['root'] / 'cat.png').read_bytes()).decode()
  status, out = _post(server['url'], {'prompt': QUESTION, 'image': image, 'max_new_tokens': MAX_NEW,
                                      'routing': True})
  assert status == 200, out
  assert out['answer'] == _cli_answer(server, capsys) and out['answer'].strip()
  assert 0 < out['new_tokens'] == len(out['tokens']) <= MAX_NEW
  tokens = out['routing']['tokens']
  assert len(tokens) == out['prompt_tokens'] + out['new_tokens']
  assert [t['kind'] for t in tokens].count('image') == 4 and all(t['top_group'] in GROUPS for t in tokens)
  assert all(abs(sum(t['group_weights']) - 1) < 1e-3 for t in tokens)
  bad = [({'image': image}, 'field "prompt" is missing'), ({'prompt': ''}, 'message is empty'),
         ({'prompt': 'hi', 'temperature': 'hot'}, "'temperature'"), ({'prompt': 'hi', 'colour': 1}, "'colour'"),
         ({'prompt': 'hi', 'image': 'not base64!'}, 'base64'),
         ({'prompt': 'hi', 'image': base64.b64encode(b'not an image').decode()}, 'cannot decode'),
         ({'prompt': 'red ' * 200}, 'longer than'), (b'{not json', 'expected JSON'), ([1, 2], 'JSON object')]
  for body, message in bad:
    status, out = _post(server['url'], body)
    assert status == 400 and message in out['error'], (body, status, out)


@pytest.mark.skipif(not CHROMEDRIVER and os.environ.get('CI') != 'true',
                    reason='needs chromium and chromium-driver (apt); CI installs them')
def test_browser_chat_streams_the_greedy_answer_and_shows_routing(server, capsys):
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  assert CHROMEDRIVER, 'chromedriver is not installed (apt-get install chromium chromium-driver)'
  opts = webdriver.ChromeOptions()
  for arg in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--window-size=1400,1600'):
    opts.add_argument(arg)
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)

  def wait_for(predicate, what: str, timeout: float = 120):
    deadline = time.time() + timeout
    while time.time() < deadline:
      value = predicate()
      if value:
        return value
      time.sleep(0.2)
    driver.save_screenshot(str(server['root'] / 'failed.png'))
    raise AssertionError(f'timed out waiting for {what}; status: {status()!r}; screenshot in {server["root"]}')

  def status() -> str:
    found = driver.find_elements(By.ID, 'status')
    return found[0].text if found else ''

  def ask(text: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, '#question textarea')
    box.clear()
    if text:
      box.send_keys(text)
    driver.find_element(By.ID, 'send').click()

  try:
    driver.get(server['url'] + '/')
    wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, '#question textarea'), 'the page')
    upload = driver.find_element(By.CSS_SELECTOR, '#image input[type=file]')
    # Bad input first: each shows in the page and the server goes on.
    upload.send_keys(str(server['root'] / 'corrupt.png'))
    wait_for(lambda: 'cannot decode' in status(), 'the corrupt image\'s error')
    ask('')
    wait_for(lambda: 'Error' in status() and 'empty' in status(), 'the empty message\'s error')
    driver.find_element(By.CSS_SELECTOR, '#image button[aria-label="Clear"]').click()
    upload = driver.find_element(By.CSS_SELECTOR, '#image input[type=file]')
    upload.send_keys(str(server['root'] / 'cat.png'))
    wait_for(lambda: 'Image loaded' in status(), 'the image')
    ask('red ' * 200)
    wait_for(lambda: 'longer than' in status(), 'the over-long prompt\'s error')
    # The question: streamed, then the routing view.
    ask(QUESTION)
    wait_for(lambda: 'Answered' in status(), 'the answer')
    bot = driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')
    assert len(bot) == 1, len(bot)
    answer = bot[0].text.strip()
    spans = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, '#routing span.tok.answer'), 'the routing view')
    driver.save_screenshot(str(server['root'] / 'serve_page.png'))
    assert answer == _cli_answer(server, capsys).strip()
    n_tokens = int(status().split('Answered: ')[1].split()[0])
    assert 0 < n_tokens <= MAX_NEW and len(spans) == n_tokens
    assert all(s.get_attribute('data-group') in GROUPS and 'background' in s.get_attribute('style') for s in spans)
    assert all(len(s.get_attribute('title').split()) == 8 for s in spans)  # V, S1, S2, L and their weights
    assert driver.find_elements(By.CSS_SELECTOR, '#heatmap img')
    # A second turn goes out in the template with the first: the JSON endpoint given that history agrees.
    ask('Is there a circle?')
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')) == 2
             and 'Answered' in status(), 'the second answer')
    second = driver.find_elements(By.CSS_SELECTOR, '#chatbot [data-testid="bot"]')[1].text.strip()
    image = base64.b64encode((server['root'] / 'cat.png').read_bytes()).decode()
    code, out = _post(server['url'], {'prompt': 'Is there a circle?', 'image': image, 'max_new_tokens': MAX_NEW,
                                      'history': [[QUESTION, answer]]})
    assert code == 200 and out['answer'].strip() == second, (out, second)
    # A folder that is not a checkpoint: an error in the page; the loaded model stays.
    box = driver.find_element(By.CSS_SELECTOR, '#checkpoint textarea, #checkpoint input')
    box.clear()
    box.send_keys(str(server['root']))
    driver.find_element(By.ID, 'load').click()
    wait_for(lambda: 'no config.json' in status(), 'the bad folder\'s error')
    with urllib.request.urlopen(server['url'] + '/api/info', timeout=10) as r:
      assert json.load(r)['checkpoint'] == server['ckpt']
  finally:
    driver.quit()
  shot = server['root'] / 'serve_page.png'
  assert shot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and shot.stat().st_size > 10_000
  print(f'screenshot: {shot}')


def _routing(groups: tuple[str, ...], t: int = 7) -> TokenRouting:
  rs = np.random.RandomState(0)
  w = rs.rand(2, t, len(groups)).astype(np.float32)
  return TokenRouting(weights=w / w.sum(-1, keepdims=True), modality=np.array([0, 1, 1, 1, 1, 0, 0]),
                      layers=(1, 3), experts=tuple(f'E{i + 1}' for i in range(len(groups))), groups=groups)


def test_routing_view_draws_every_variant():
  pieces, kinds = ['<s>', '', '', '', '', 'Hi', '!'], ['prompt', 'image', 'image', 'image', 'image', 'prompt', 'answer']
  assert 'dense' in routing_view.tokens_html(None, pieces, kinds)
  assert routing_view.heatmap(None, Image.new('RGB', (8, 8))) is None
  for groups in (('vision', 'shared', 'shared', 'language'), ('shared',) * 4):  # MoIIE; vanilla (MoE-LLaVA)
    tr = _routing(groups)
    for layer in (None, 0, 1):
      page = routing_view.tokens_html(tr, pieces, kinds, layer)
      assert page.count('class="tok ') == 3 and page.count('class="tok answer') == 1
      assert page.count('[image: 4 tokens') == 1
      top = tr.top_groups(layer)
      assert f'data-group="{top[-1]}"' in page
      heat = routing_view.heatmap(tr, Image.new('RGB', (30, 20), 'white'), layer, size=32)
      assert heat.shape == (32, 32, 3) and heat.dtype == np.uint8
    assert set(tr.top_groups()) == {'shared'} or 'vision' in groups
  with pytest.raises(ValueError, match='token texts'):
    routing_view.tokens_html(_routing(('shared',) * 4), pieces[:-1], kinds[:-1])
