"""The training loop's progress bar, and its stderr while the bar is up.

A bar redraws its own line with '\\r'. A warning written to stderr meanwhile would be glued to the end of that line,
so while the bar is up stderr (and every logging handler writing to it) goes through `tqdm.write`, which clears the
bar, prints the text on its own lines and redraws the bar below it.

The bar counts micro-steps (one batch each), as `log_every` and `checkpoint_every` do; `total_steps` counts
optimizer updates, which are `grad_accum_steps` micro-steps each. The bar's label says so.
"""

from __future__ import annotations

import io
import logging
import sys


class NoBar:
  """The bar of a run without one (other processes, tests)."""

  def update(self, n: int) -> None:
    pass

  def set_postfix(self, **kw) -> None:
    pass

  def close(self) -> None:
    pass


class _ThroughBar(io.TextIOBase):
  """A text stream that writes whole lines above the progress bar."""

  def __init__(self, stream):
    super().__init__()
    self._stream = stream
    self._pending = ''

  def write(self, text: str) -> int:
    from tqdm import tqdm
    self._pending += text
    while '\n' in self._pending:
      line, self._pending = self._pending.split('\n', 1)
      tqdm.write(line, file=self._stream)
    return len(text)

  def flush(self) -> None:
    if self._pending:
      from tqdm import tqdm
      tqdm.write(self._pending, file=self._stream)
      self._pending = ''
    self._stream.flush()

  def isatty(self) -> bool:
    return self._stream.isatty()

  @property
  def encoding(self):
    return getattr(self._stream, 'encoding', 'utf-8')


def _stderr_handlers(stream) -> list[logging.StreamHandler]:
  handlers = list(logging.getLogger().handlers)
  try:
    from absl import logging as absl_logging
    handlers.append(absl_logging.get_absl_handler().python_handler)
  except (ImportError, AttributeError):
    pass
  return [h for h in handlers if isinstance(h, logging.StreamHandler) and h.stream is stream]


class Bar:
  """A tqdm bar over micro-steps; stderr and its logging handlers write above it until `close`."""

  def __init__(self, total: int, start: int, updates_per_step: int):
    from tqdm import tqdm
    self._stderr = sys.stderr
    unit = 'micro-step' if updates_per_step > 1 else 'step'
    self._bar = tqdm(total=total, initial=start, unit=unit, dynamic_ncols=True, leave=False, file=self._stderr,
                     desc=f'train ({updates_per_step} micro-steps/update)' if updates_per_step > 1 else 'train')
    self._proxy = _ThroughBar(self._stderr)
    self._handlers = _stderr_handlers(self._stderr)
    for h in self._handlers:
      h.setStream(self._proxy)
    sys.stderr = self._proxy
    self._closed = False

  def update(self, n: int) -> None:
    self._bar.update(n)

  def set_postfix(self, **kw) -> None:
    self._bar.set_postfix(**kw)

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    self._proxy.flush()
    if sys.stderr is self._proxy:
      sys.stderr = self._stderr
    for h in self._handlers:
      if h.stream is self._proxy:
        h.setStream(self._stderr)
    self._bar.close()


class Lines(NoBar):
  """Progress where stderr is not a terminal (a log file, a pipe, a scheduler): a plain line on stdout at each
  logged step, instead of a bar whose carriage returns would fill the log."""

  def __init__(self, total: int, start: int):
    self._total, self._n = total, start

  def update(self, n: int) -> None:
    self._n += n

  def set_postfix(self, **kw) -> None:  # called at each logged step, before that step's update
    values = ' '.join(f'{k} {v}' for k, v in kw.items())
    print(f'micro-step {self._n + 1}/{self._total} {values}', flush=True)


def progress(total: int, start: int, enabled: bool, updates_per_step: int = 1) -> Bar | NoBar:
  """The progress of a run: `total` micro-steps, `start` done. A bar on a terminal, lines elsewhere, nothing when
  not `enabled`."""
  if not enabled:
    return NoBar()
  if not sys.stderr.isatty():
    return Lines(total, start)
  return Bar(total, start, updates_per_step)
