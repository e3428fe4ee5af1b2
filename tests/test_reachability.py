"""An unreachable Cloud Storage stops the job, the query script and the report at once, in one line.

Cloud Storage is a local endpoint here (STORAGE_EMULATOR_HOST, which the storage client
itself honours): a closed port, or a real HTTP server on this machine. The machine has
no Google Cloud credentials unless a test gives it some."""

import http.server
import json
import socket
import threading

import pytest

import query_index
import run_pipeline
from pipeline.reachability import UnreachableError, check_cloud_storage_reachable
from views import run_report

PROXY_VARIABLES = ('http_proxy', 'https_proxy', 'all_proxy', 'no_proxy')


@pytest.fixture(autouse=True)
def no_proxy_from_the_environment(monkeypatch):
  for name in PROXY_VARIABLES:
    monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(autouse=True)
def no_credentials(monkeypatch, tmp_path):
  monkeypatch.delenv('GOOGLE_APPLICATION_CREDENTIALS', raising=False)
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path / 'empty-gcloud-config'))
  monkeypatch.setenv('NO_GCE_CHECK', 'True')  # not a Compute Engine VM: no metadata server


@pytest.fixture
def closed_endpoint(monkeypatch):
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  # Closed once the socket is: nothing listens there.
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:%d' % port)
  return port


class _AnswerEverything(http.server.BaseHTTPRequestHandler):
  """Answers every request 404, as Cloud Storage answers a request for nothing; records
  the request lines it got."""
  seen = []

  def do_HEAD(self):  # pylint: disable=invalid-name
    self.seen.append(self.requestline)
    self.send_response(404)
    self.end_headers()

  def log_message(self, *args):  # pylint: disable=arguments-differ
    pass


@pytest.fixture
def http_server():
  _AnswerEverything.seen = []
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _AnswerEverything)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield server
  server.shutdown()
  server.server_close()


def test_an_unreachable_input_stops_the_job_in_one_line(tmp_path, closed_endpoint, capsys):
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(['--input', 'gs://bucket/photos/*.jpg', '--output', str(tmp_path / 'out')])
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('run_pipeline.py:')]
  assert exit_info.value.code == 2 and len(lines) == 1
  assert ('cannot reach Cloud Storage for --input gs://bucket/photos/*.jpg '
          '(http://127.0.0.1:%d: ' % closed_endpoint) in lines[0]
  assert 'Connection refused); check the network connection' in lines[0]
  assert not (tmp_path / 'out').exists()


def test_an_unreachable_output_is_named(tmp_path, closed_endpoint, capsys):
  (tmp_path / 'a.jpg').write_bytes(b'not read')
  with pytest.raises(SystemExit):
    run_pipeline.main(['--input', str(tmp_path), '--output', 'gs://bucket/out'])
  assert 'cannot reach Cloud Storage for --output gs://bucket/out' in capsys.readouterr().err


def test_index_only_on_an_unreachable_run(closed_endpoint, capsys):
  with pytest.raises(SystemExit):
    run_pipeline.main(['--output', 'gs://bucket/out', '--index_only'])
  assert 'cannot reach Cloud Storage for --output gs://bucket/out' in capsys.readouterr().err


def test_a_query_of_an_unreachable_run_is_one_line(closed_endpoint, capsys):
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', 'gs://bucket/out', '--key', 'a.jpg'])
  lines = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2 and len(lines) == 1
  assert lines[0].startswith('query_index.py: error: cannot reach Cloud Storage for --run '
                             'gs://bucket/out')


def test_local_paths_never_ask_the_network(closed_endpoint):
  check_cloud_storage_reachable([('--input', '/photos/*.jpg'), ('--output', 'out/')], 'prog')


def test_any_answer_means_reachable_and_missing_credentials_are_noted(http_server, monkeypatch,
                                                                     capsys):
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:%d' % http_server.server_port)
  check_cloud_storage_reachable([('--input', 'gs://bucket/photos/*.jpg')], 'prog')
  assert _AnswerEverything.seen == ['HEAD / HTTP/1.1']
  assert capsys.readouterr().err == (
      'prog: note: no Google Cloud credentials found: Beam retries for them for about 20 s, '
      'then reads Cloud Storage anonymously, which only public buckets allow; '
      '`gcloud auth application-default login` sets them up\n')


def test_a_machine_with_credentials_gets_no_note(http_server, monkeypatch, tmp_path, capsys):
  # What `gcloud auth application-default login` writes; loading it needs no network.
  credentials = tmp_path / 'application_default_credentials.json'
  credentials.write_text(json.dumps({'type': 'authorized_user', 'client_id': 'id',
                                     'client_secret': 'secret', 'refresh_token': 'token'}))
  monkeypatch.setenv('GOOGLE_APPLICATION_CREDENTIALS', str(credentials))
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:%d' % http_server.server_port)
  check_cloud_storage_reachable([('--input', 'gs://bucket/photos/*.jpg')], 'prog')
  assert _AnswerEverything.seen == ['HEAD / HTTP/1.1']
  assert capsys.readouterr().err == ''


def test_a_host_this_machine_cannot_resolve_is_reached_through_the_proxy(http_server,
                                                                         monkeypatch):
  # '.invalid' never resolves (RFC 2606); the proxy does the resolving for the client.
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://storage.invalid')
  with pytest.raises(UnreachableError, match='storage.invalid'):
    check_cloud_storage_reachable([('--input', 'gs://bucket/a.jpg')], 'prog')
  monkeypatch.setenv('HTTP_PROXY', 'http://127.0.0.1:%d' % http_server.server_port)
  check_cloud_storage_reachable([('--input', 'gs://bucket/a.jpg')], 'prog')
  assert _AnswerEverything.seen == ['HEAD http://storage.invalid/ HTTP/1.1']


def test_a_report_of_an_unreachable_run_is_one_line(closed_endpoint, capsys):
  with pytest.raises(SystemExit) as exit_info:
    run_report.main(['--run', 'gs://bucket/out'])
  lines = capsys.readouterr().err.strip().splitlines()
  assert exit_info.value.code == 2
  assert 'error: cannot reach Cloud Storage for --run gs://bucket/out' in lines[-1]
