"""The training progress: warnings and log lines get their own lines above the bar, never glued to it; without a
terminal, plain lines instead of a bar."""

import io
import logging
import sys

from moiie_jax.train import progress


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_warnings_and_logs_print_above_the_bar_not_into_it(monkeypatch):
  screen = _Terminal()
  monkeypatch.setattr(sys, 'stderr', screen)
  handler = logging.StreamHandler(screen)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    bar = progress.progress(total=10, start=0, enabled=True, updates_per_step=2)
    assert isinstance(bar, progress.Bar)
    bar.update(3)
    bar.set_postfix(loss='1.2345')
    # What warnings.showwarning does with a warning: one write to sys.stderr, looked up at the time.
    print('train.py:1: UserWarning: a warning in the middle of training', file=sys.stderr)
    logging.getLogger('moiie_jax.test').warning('a log record in the middle of training')
    bar.update(1)
    bar.close()
  finally:
    root.removeHandler(handler)
  assert sys.stderr is screen and handler.stream is screen  # restored
  text = screen.getvalue()
  assert '3/10' in text and 'micro-step' in text and '2 micro-steps/update' in text
  for message in ('a warning in the middle of training', 'a log record in the middle of training'):
    line_start = text.rfind('\n', 0, text.index(message)) + 1
    before = text[line_start:text.index(message)]
    # What precedes the message on its line is at most the bar's erasure ('\r' + blanks + '\r'), never the bar.
    assert before.split('\r')[-1].strip() == '' or 'UserWarning' in before, repr(before)
    assert '%|' not in before.split('\r')[-1], repr(before)


def test_lines_without_a_terminal(monkeypatch, capsys):
  monkeypatch.setattr(sys, 'stderr', io.StringIO())
  bar = progress.progress(total=8, start=2, enabled=True)
  assert isinstance(bar, progress.Lines)
  bar.set_postfix(loss='0.5000')
  bar.update(1)
  bar.close()
  assert capsys.readouterr().out == 'micro-step 3/8 loss 0.5000\n'
  assert isinstance(progress.progress(total=8, start=0, enabled=False), progress.NoBar)
