"""Beam's local job service and external SDK worker pool as separate processes on loopback."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time

START_TIMEOUT_S = 120


# The worker pool logs the port it listens on only at INFO, below its default level, so
# it is started with logging turned up: then it can bind port 0 and report the port the
# system gave it. A port picked here beforehand could be taken by a parallel test run in
# between, and gRPC binds with SO_REUSEPORT, so the two pools would share it silently.
_WORKER_POOL_WITH_LOGGING = (
    'import logging, sys; logging.basicConfig(level=logging.INFO); '
    'from apache_beam.runners.worker import worker_pool_main; '
    'worker_pool_main.main(sys.argv[1:])')
_WORKER_POOL_PORT = re.compile(r'Listening for workers at localhost:(\d+)')


def _wait_for(condition, process, what, log_path, timeout=START_TIMEOUT_S):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError('%s exited with %s:\n%s' % (what, process.returncode,
                                                      log_path.read_text()[-3000:]))
    if condition():
      return
    time.sleep(0.2)
  raise TimeoutError('%s did not start within %ds' % (what, timeout))


def _accepts_connections(port):
  try:
    with socket.create_connection(('127.0.0.1', port), timeout=1):
      return True
  except OSError:
    return False


def _start(argv, log_path, work_dir):
  # The worker pool starts SDK workers as plain `python`: the virtual environment's
  # interpreter must come first on PATH, or the workers cannot import Beam.
  env = dict(os.environ)
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  log = open(log_path, 'wb')  # pylint: disable=consider-using-with
  try:
    # A session of its own, so that stopping it also stops the workers it started.
    return subprocess.Popen([sys.executable] + argv, stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(work_dir), env=env,
                            start_new_session=True)
  finally:
    log.close()


def _exited_unreaped(pid):
  return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None


def _stop(process, timeout=15):
  """Stops the process and every process it started (its process group). The group is
  signalled only while its leader is still unreaped, so its id cannot have been reused."""
  if process.returncode is not None:
    return
  os.killpg(process.pid, signal.SIGTERM)
  deadline = time.monotonic() + timeout
  while not _exited_unreaped(process.pid) and time.monotonic() < deadline:
    time.sleep(0.1)
  with contextlib.suppress(ProcessLookupError):
    os.killpg(process.pid, signal.SIGKILL)  # whatever is left of the group
  process.wait(timeout=timeout)


@contextlib.contextmanager
def job_service_and_worker_pool(work_dir):
  """Yields (job endpoint, worker pool endpoint); stops both and their workers on exit."""
  work_dir.mkdir(parents=True, exist_ok=True)
  port_file = work_dir / 'job_service.port'
  processes = []
  try:
    job_service = _start(
        ['-m', 'apache_beam.runners.portability.local_job_service_main', '--port', '0',
         '--port_file', str(port_file), '--staging_dir', str(work_dir / 'staging')],
        work_dir / 'job_service.log', work_dir)
    processes.append(job_service)
    worker_pool_log = work_dir / 'worker_pool.log'
    worker_pool = _start(['-c', _WORKER_POOL_WITH_LOGGING, '--service_port', '0'],
                         worker_pool_log, work_dir)
    processes.append(worker_pool)
    _wait_for(lambda: port_file.exists() and port_file.read_text().strip(), job_service,
              'the job service', work_dir / 'job_service.log')
    job_port = int(port_file.read_text())
    _wait_for(lambda: _accepts_connections(job_port), job_service, 'the job service',
              work_dir / 'job_service.log')
    _wait_for(lambda: _WORKER_POOL_PORT.search(worker_pool_log.read_text()), worker_pool,
              'the worker pool', worker_pool_log)
    worker_port = int(_WORKER_POOL_PORT.search(worker_pool_log.read_text()).group(1))
    _wait_for(lambda: _accepts_connections(worker_port), worker_pool, 'the worker pool',
              worker_pool_log)
    yield 'localhost:%d' % job_port, 'localhost:%d' % worker_port
  finally:
    for process in reversed(processes):
      _stop(process)
