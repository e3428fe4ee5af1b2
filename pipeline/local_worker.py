"""Imported first by each local DirectRunner worker process (a Beam plugin): Ctrl-C is the launcher's.

A Ctrl-C on a terminal reaches every process of the foreground group, the DirectRunner's
worker processes too, and each printed its own KeyboardInterrupt traceback, 90 to 190
lines before the launcher's one line. Here a worker leaves the signal to the launcher,
which stops its workers itself (pipeline.runners.stop_if_a_worker_dies) and says what
happened in one line.
"""

import signal
import sys
import threading

_WORKER_MAIN = 'apache_beam.runners.worker.sdk_worker_main'


def _in_a_worker_process():
  main = sys.modules.get('__main__')
  return getattr(getattr(main, '__spec__', None), 'name', None) == _WORKER_MAIN


# Beam imports plugins in the worker's main thread as it starts, before it takes work;
# a signal's handling can only be set from there. Imported anywhere else (the launcher,
# a test), this module changes nothing.
if _in_a_worker_process() and threading.current_thread() is threading.main_thread():
  signal.signal(signal.SIGINT, signal.SIG_IGN)
